//! The user a new container's process runs as, resolved as containerd's `ctr run` resolves an image's
//! `User` (`oci.WithImageConfig` → `WithUser` / `WithUsername` / `WithUserID`, then `WithAdditionalGIDs`):
//! names are looked up in the image's /etc/passwd and /etc/group, read from the container's prepared
//! snapshot mounted read-only in a temporary folder ([`resolve_in_snapshot`]).
//!
//! The rules ([`resolve`]), as containerd 1.6/1.7 applies them:
//! - empty: uid 0, gid 0;
//! - `UID`: the first /etc/passwd entry of that uid gives the gid; a uid not there (or no /etc/passwd) is
//!   used as is, with gid 0;
//! - `NAME`: the first /etc/passwd entry of that name gives uid and gid; a name not there is an error
//!   (`root` alone is kept working without /etc/passwd, as 0:0, as `run containerd` always did);
//! - `USER:GROUP`, each a number or a name: two numbers are used as they are; a name is looked up (users in
//!   /etc/passwd, groups in /etc/group; not found is an error), a number is taken as is (the user's passwd
//!   gid is not used when a group is given; an empty part counts as 0);
//! - more than one `:` is an error;
//! - the additional gids are the /etc/group entries (in file order) whose member list names the user that
//!   the uid belongs to in /etc/passwd (root's when the image sets no user), except a group named as the
//!   user; none when the uid has no passwd entry or there is no /etc/group.
//!
//! The files are parsed as runc's `libcontainer/user` parses them (which containerd uses): passwd lines
//! are trimmed, blank lines skipped, fields split on `:`, a number that does not parse counts as 0, missing
//! fields are empty; group member lists are split on `,`.

use std::ffi::CString;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use cedana::error::ErrorKind;
use cedana_protos::containerd::types::Mount;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

use super::ContainerdError;

/// The largest /etc/passwd or /etc/group read (real ones are a few KiB).
const MAX_FILE: u64 = 16 << 20;

/// The user and groups of a container's process (`process.user` of its OCI spec).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, from the image's /etc/group.
    pub additional_gids: Vec<u32>,
}

impl ProcessUser {
    /// `process.user` of an OCI spec (`additionalGids` only when there are some, as containerd writes it).
    pub fn to_json(&self) -> serde_json::Value {
        let mut user = serde_json::json!({ "uid": self.uid, "gid": self.gid });
        if !self.additional_gids.is_empty() {
            user["additionalGids"] = serde_json::json!(self.additional_gids);
        }
        user
    }
}

/// An /etc/passwd entry (the fields used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// An /etc/group entry (the fields used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    /// The users listed as members.
    pub members: Vec<String>,
}

/// A number field of passwd or group: one that does not parse counts as 0, as runc's parser has it.
fn number(field: Option<&str>) -> u32 {
    field.and_then(|f| f.parse().ok()).unwrap_or(0)
}

/// The entries of an /etc/passwd.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            // name:password:uid:gid:gecos:home:shell
            let mut fields = line.split(':');
            let name = fields.next().unwrap_or_default().to_string();
            let _password = fields.next();
            PasswdEntry { name, uid: number(fields.next()), gid: number(fields.next()) }
        })
        .collect()
}

/// The entries of an /etc/group.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            // name:password:gid:member,member...
            let mut fields = line.split(':');
            let name = fields.next().unwrap_or_default().to_string();
            let _password = fields.next();
            let gid = number(fields.next());
            let members = fields.next().filter(|m| !m.is_empty()).map(|m| m.split(',').map(str::to_string).collect());
            GroupEntry { name, gid, members: members.unwrap_or_default() }
        })
        .collect()
}

/// An image's accounts: its /etc/passwd and /etc/group, `None` where the file does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    pub passwd: Option<Vec<PasswdEntry>>,
    pub group: Option<Vec<GroupEntry>>,
}

impl Accounts {
    /// The accounts of the root filesystem at `root` (its /etc/passwd and /etc/group, symbolic links
    /// resolved inside `root`).
    pub fn read(root: &Path) -> std::io::Result<Accounts> {
        let passwd = read_in_root(root, "etc/passwd")?.map(|t| parse_passwd(&t));
        let group = read_in_root(root, "etc/group")?.map(|t| parse_group(&t));
        Ok(Accounts { passwd, group })
    }

    fn user_by_name(&self, name: &str) -> Option<&PasswdEntry> {
        self.passwd.iter().flatten().find(|u| u.name == name)
    }

    fn user_by_uid(&self, uid: u32) -> Option<&PasswdEntry> {
        self.passwd.iter().flatten().find(|u| u.uid == uid)
    }

    /// The gids of the groups that list the user of `uid` (by its passwd name), but the group named as the
    /// user.
    fn additional_gids(&self, uid: u32) -> Vec<u32> {
        let Some(name) = self.user_by_uid(uid).map(|u| u.name.as_str()) else { return Vec::new() };
        self.group.iter().flatten().filter(|g| g.name != name && g.members.iter().any(|m| m == name)).map(|g| g.gid).collect()
    }
}

/// Reads file `relative` of `root`, resolving it (symbolic links included) as if `root` were `/`; `None`
/// when it does not exist.
fn read_in_root(root: &Path, relative: &str) -> std::io::Result<Option<String>> {
    let dir = std::fs::File::open(root)?;
    let how = OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC).resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let file = match openat2(&dir, relative, how) {
        Ok(fd) => std::fs::File::from(fd),
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE).read_to_end(&mut bytes)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Why an image's user could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user {user:?} is not in the image's /etc/passwd")]
    UnknownUser { user: String },
    #[error("the image has no /etc/passwd to look user {user:?} up in")]
    NoPasswd { user: String },
    #[error("group {group:?} is not in the image's /etc/group")]
    UnknownGroup { group: String },
    #[error("the image has no /etc/group to look group {group:?} up in")]
    NoGroupFile { group: String },
    #[error("{user:?} is not a user (USER, UID, USER:GROUP or UID:GID, each a name or a number)")]
    Invalid { user: String },
}

/// One side of `USER:GROUP`: a number (an empty side counts as 0), or a name to look up.
enum Part<'a> {
    Id(u32),
    Name(&'a str),
}

fn part(s: &str) -> Part<'_> {
    if s.is_empty() {
        return Part::Id(0);
    }
    s.parse().map(Part::Id).unwrap_or(Part::Name(s))
}

/// The process user of an image whose config says `user`, given its accounts (see the module's rules).
pub fn resolve(user: &str, accounts: &Accounts) -> Result<ProcessUser, UserError> {
    let (uid, gid) = ids(user, accounts)?;
    Ok(ProcessUser { uid, gid, additional_gids: accounts.additional_gids(uid) })
}

/// The uid and gid of `user` (the first half of [`resolve`]).
fn ids(user: &str, accounts: &Accounts) -> Result<(u32, u32), UserError> {
    let by_name = |name: &str| match (&accounts.passwd, accounts.user_by_name(name)) {
        (_, Some(u)) => Ok(u),
        (None, None) => Err(UserError::NoPasswd { user: name.to_string() }),
        (Some(_), None) => Err(UserError::UnknownUser { user: name.to_string() }),
    };
    let parts: Vec<&str> = user.split(':').collect();
    match parts.as_slice() {
        [""] => Ok((0, 0)),
        [one] => match part(one) {
            Part::Id(uid) => Ok((uid, accounts.user_by_uid(uid).map_or(0, |u| u.gid))),
            // `run containerd` ran `root` as 0:0 before names were looked up; an image without a passwd
            // entry for it keeps doing so (containerd would refuse it).
            Part::Name("root") if accounts.user_by_name("root").is_none() => Ok((0, 0)),
            Part::Name(name) => by_name(name).map(|u| (u.uid, u.gid)),
        },
        [u, g] => {
            let uid = match part(u) {
                Part::Id(uid) => uid,
                Part::Name(name) => by_name(name)?.uid,
            };
            let gid = match part(g) {
                Part::Id(gid) => gid,
                Part::Name(name) => match &accounts.group {
                    None => return Err(UserError::NoGroupFile { group: name.to_string() }),
                    Some(groups) => groups
                        .iter()
                        .find(|e| e.name == name)
                        .map(|e| e.gid)
                        .ok_or_else(|| UserError::UnknownGroup { group: name.to_string() })?,
                },
            };
            Ok((uid, gid))
        }
        _ => Err(UserError::Invalid { user: user.to_string() }),
    }
}

/// The process user of `image`, whose config says `user`, read from the container's prepared snapshot
/// (`mounts`, as the snapshotter gave them), mounted read-only in a temporary folder for the lookup and
/// unmounted again whatever happens.
pub fn resolve_in_snapshot(user: &str, image: &str, mounts: &[Mount]) -> Result<ProcessUser, ContainerdError> {
    resolve_in_snapshot_under(&std::env::temp_dir(), user, image, mounts)
}

/// [`resolve_in_snapshot`], with the temporary folder made in `parent`.
fn resolve_in_snapshot_under(parent: &Path, user: &str, image: &str, mounts: &[Mount]) -> Result<ProcessUser, ContainerdError> {
    let accounts = {
        let mounted = TempMount::new(parent, mounts).map_err(|e| {
            ContainerdError::new(
                e.kind,
                format!(
                    "reading the users of image {image} (to resolve its user {user:?}): mounting its snapshot: {}",
                    e.message
                ),
            )
        })?;
        Accounts::read(mounted.path()).map_err(|e| {
            ContainerdError::new(
                ErrorKind::of_io(&e),
                format!("reading /etc/passwd and /etc/group of image {image} (to resolve its user {user:?}): {e}"),
            )
        })?
    };
    let resolved = resolve(user, &accounts).map_err(|e| {
        let kind =
            if matches!(e, UserError::Invalid { .. }) { ErrorKind::InvalidArgument } else { ErrorKind::FailedPrecondition };
        ContainerdError::new(
            kind,
            format!(
                "image {image} runs as {user:?}, but {e}: add the user to the image's /etc/passwd (and its groups to \
                 /etc/group), or set the image's User to a numeric UID or UID:GID"
            ),
        )
    })?;
    tracing::debug!(image, user, uid = resolved.uid, gid = resolved.gid, additional_gids = ?resolved.additional_gids, "resolved the image's user");
    Ok(resolved)
}

/// A failure to mount or unmount, with its kind.
struct MountError {
    kind: ErrorKind,
    message: String,
}

/// A snapshot's mounts, mounted read-only, in order, on a new temporary folder; unmounted (in reverse
/// order) and the folder removed when dropped.
struct TempMount {
    dir: Option<tempfile::TempDir>,
    /// How many of the mounts are mounted.
    mounted: usize,
}

impl TempMount {
    fn new(parent: &Path, mounts: &[Mount]) -> Result<TempMount, MountError> {
        if mounts.is_empty() {
            return Err(MountError { kind: ErrorKind::FailedPrecondition, message: "the snapshotter gave no mounts".into() });
        }
        let dir = tempfile::Builder::new()
            .prefix("cedana-rootfs-")
            .tempdir_in(parent)
            .map_err(|e| MountError { kind: ErrorKind::of_io(&e), message: format!("creating a temporary folder: {e}") })?;
        let mut this = TempMount { dir: Some(dir), mounted: 0 };
        let target = this.path().to_path_buf();
        for m in mounts {
            // On error, dropping `this` unmounts what was mounted.
            mount_read_only(m, &target)?;
            this.mounted += 1;
        }
        Ok(this)
    }

    fn path(&self) -> &Path {
        // Invariant: `dir` is only taken in `drop`.
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let path = dir.path().to_path_buf();
        for _ in 0..self.mounted {
            if let Err(e) = unmount(&path) {
                // Never remove a folder something may still be mounted on: leave it.
                tracing::warn!(error = %e, path = %path.display(), "unmounting a container's snapshot read for its users; left in place");
                let _ = dir.keep();
                return;
            }
        }
        if let Err(e) = dir.close() {
            tracing::warn!(error = %e, path = %path.display(), "removing a temporary mount folder");
        }
    }
}

/// Mount flags by option name (as containerd's `mount.Mount` parses them); other options are data.
const FLAGS: &[(&str, libc::c_ulong, bool)] = &[
    ("bind", libc::MS_BIND, false),
    ("rbind", libc::MS_BIND | libc::MS_REC, false),
    ("nosuid", libc::MS_NOSUID, false),
    ("suid", libc::MS_NOSUID, true),
    ("nodev", libc::MS_NODEV, false),
    ("dev", libc::MS_NODEV, true),
    ("noexec", libc::MS_NOEXEC, false),
    ("exec", libc::MS_NOEXEC, true),
    ("sync", libc::MS_SYNCHRONOUS, false),
    ("async", libc::MS_SYNCHRONOUS, true),
    ("dirsync", libc::MS_DIRSYNC, false),
    ("noatime", libc::MS_NOATIME, false),
    ("atime", libc::MS_NOATIME, true),
    ("nodiratime", libc::MS_NODIRATIME, false),
    ("diratime", libc::MS_NODIRATIME, true),
    ("relatime", libc::MS_RELATIME, false),
    ("norelatime", libc::MS_RELATIME, true),
    ("strictatime", libc::MS_STRICTATIME, false),
    ("nostrictatime", libc::MS_STRICTATIME, true),
];

/// The flags and data of a read-only mount of `m` (containerd's `tryReadonlyMounts`): an overlay loses
/// its upper and work folders, the upper folder becoming the topmost lower one; other mounts get `ro`.
fn read_only_options(m: &Mount) -> (libc::c_ulong, String) {
    let mut flags = libc::MS_RDONLY;
    let mut data = Vec::new();
    let upper = m.options.iter().find_map(|o| o.strip_prefix("upperdir="));
    for option in &m.options {
        if option == "ro" || option == "rw" || option.starts_with("workdir=") || option.starts_with("upperdir=") {
            continue;
        }
        if let Some(&(_, flag, clear)) = FLAGS.iter().find(|(name, _, _)| name == option) {
            if clear {
                flags &= !flag;
            } else {
                flags |= flag;
            }
            continue;
        }
        match (m.r#type.as_str(), option.strip_prefix("lowerdir="), upper) {
            ("overlay", Some(lower), Some(upper)) => data.push(format!("lowerdir={upper}:{lower}")),
            _ => data.push(option.clone()),
        }
    }
    (flags, data.join(","))
}

fn c_string(s: &[u8], what: &str) -> Result<CString, MountError> {
    CString::new(s)
        .map_err(|_| MountError { kind: ErrorKind::InvalidArgument, message: format!("the mount's {what} holds a NUL byte") })
}

/// Mounts `m` read-only on `target`.
fn mount_read_only(m: &Mount, target: &Path) -> Result<(), MountError> {
    let (flags, data) = read_only_options(m);
    let source = c_string(m.source.as_bytes(), "source")?;
    let kind = c_string(m.r#type.as_bytes(), "type")?;
    let target_c = c_string(target.as_os_str().as_bytes(), "target")?;
    let data_c = c_string(data.as_bytes(), "options")?;
    let failed = |step: &str| {
        let e = std::io::Error::last_os_error();
        MountError {
            kind: ErrorKind::of_io(&e),
            message: format!("{step} {} mount of {} on {} ({data}): {e}", m.r#type, m.source, target.display()),
        }
    };
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target_c.as_ptr(), kind.as_ptr(), flags, data_c.as_ptr().cast()) };
    if rc != 0 {
        return Err(failed("the"));
    }
    if flags & libc::MS_BIND != 0 {
        // A bind mount ignores MS_RDONLY until remounted.
        let remount = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        // SAFETY: as above; null type and data are allowed for a remount.
        let rc = unsafe { libc::mount(std::ptr::null(), target_c.as_ptr(), std::ptr::null(), remount, std::ptr::null()) };
        if rc != 0 {
            let e = failed("making read-only the");
            let _ = unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts the topmost mount on `target`.
fn unmount(target: &Path) -> std::io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        \n  app:x:1234:2345:App:/home/app:/bin/sh  \n\
        dup:x:1234:9:second entry of uid 1234:/:/bin/sh\n\
        odd:x:notanumber\n";
    const GROUP: &str = "root:x:0:\n\
        daemon:x:1:\n\
        app:x:2345:app\n\
        extra:x:3456:other,app\n\
        wheel:x:10:root\n\
        notme:x:4567:apps,other\n\
        more:x:5678:app\r\n";

    fn accounts() -> Accounts {
        Accounts { passwd: Some(parse_passwd(PASSWD)), group: Some(parse_group(GROUP)) }
    }

    fn user(uid: u32, gid: u32, additional: &[u32]) -> ProcessUser {
        ProcessUser { uid, gid, additional_gids: additional.to_vec() }
    }

    #[test]
    fn passwd_lines_are_parsed_as_runc_does() {
        let users = parse_passwd(PASSWD);
        let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "app", "dup", "odd"], "blank lines skipped, lines trimmed");
        assert_eq!(users[2], PasswdEntry { name: "app".into(), uid: 1234, gid: 2345 });
        assert_eq!(users[4], PasswdEntry { name: "odd".into(), uid: 0, gid: 0 }, "bad or missing numbers count as 0");
        assert!(parse_passwd("").is_empty());
    }

    #[test]
    fn group_lines_are_parsed_with_their_members() {
        let groups = parse_group(GROUP);
        assert_eq!(groups.len(), 7);
        assert_eq!(groups[0], GroupEntry { name: "root".into(), gid: 0, members: vec![] });
        assert_eq!(groups[3], GroupEntry { name: "extra".into(), gid: 3456, members: vec!["other".into(), "app".into()] });
        assert_eq!(groups[6].members, ["app"], "a CRLF line ending is not part of the last member");
        assert_eq!(parse_group("g:x:7")[0], GroupEntry { name: "g".into(), gid: 7, members: vec![] });
    }

    #[test]
    fn names_are_looked_up_with_their_additional_groups() {
        let a = accounts();
        assert_eq!(resolve("app", &a).unwrap(), user(1234, 2345, &[3456, 5678]), "the group named app is not additional");
        assert_eq!(resolve("daemon", &a).unwrap(), user(1, 1, &[]));
        assert_eq!(resolve("root", &a).unwrap(), user(0, 0, &[10]), "root's groups");
        assert_eq!(resolve("", &a).unwrap(), user(0, 0, &[10]), "no user is root, with root's groups");
    }

    #[test]
    fn user_and_group_pairs_take_numbers_as_they_are_and_look_names_up() {
        let a = accounts();
        assert_eq!(resolve("app:extra", &a).unwrap(), user(1234, 3456, &[3456, 5678]));
        assert_eq!(resolve("app:77", &a).unwrap(), user(1234, 77, &[3456, 5678]), "a numeric group replaces passwd's gid");
        assert_eq!(resolve("1234:extra", &a).unwrap(), user(1234, 3456, &[3456, 5678]));
        assert_eq!(resolve("42:43", &a).unwrap(), user(42, 43, &[]), "two numbers need no lookup");
        assert_eq!(resolve("1234:5", &a).unwrap(), user(1234, 5, &[3456, 5678]), "the uid's passwd name gives the groups");
        assert_eq!(resolve("app:", &a).unwrap(), user(1234, 0, &[3456, 5678]), "an empty group counts as 0");
        assert_eq!(resolve(":5", &a).unwrap(), user(0, 5, &[10]));
    }

    #[test]
    fn numeric_users_take_their_passwd_gid_or_zero() {
        let a = accounts();
        assert_eq!(resolve("1234", &a).unwrap(), user(1234, 2345, &[3456, 5678]), "the first entry of the uid");
        assert_eq!(resolve("1000", &a).unwrap(), user(1000, 0, &[]), "not in passwd: as is, gid 0");
        let none = Accounts::default();
        assert_eq!(resolve("1000", &none).unwrap(), user(1000, 0, &[]), "no passwd: as is, gid 0");
        assert_eq!(resolve("1000:100", &none).unwrap(), user(1000, 100, &[]));
        assert_eq!(resolve("", &none).unwrap(), user(0, 0, &[]));
        assert_eq!(resolve("root", &none).unwrap(), user(0, 0, &[]), "root still runs without a passwd");
    }

    #[test]
    fn unknown_names_and_bad_users_are_errors_that_name_them() {
        let a = accounts();
        assert_eq!(resolve("nobody", &a).unwrap_err(), UserError::UnknownUser { user: "nobody".into() });
        assert_eq!(resolve("nobody:app", &a).unwrap_err(), UserError::UnknownUser { user: "nobody".into() });
        assert_eq!(resolve("app:staff", &a).unwrap_err(), UserError::UnknownGroup { group: "staff".into() });
        assert_eq!(resolve("a:b:c", &a).unwrap_err(), UserError::Invalid { user: "a:b:c".into() });
        let none = Accounts::default();
        assert_eq!(resolve("app", &none).unwrap_err(), UserError::NoPasswd { user: "app".into() });
        assert_eq!(resolve("1:staff", &none).unwrap_err(), UserError::NoGroupFile { group: "staff".into() });
        let no_group = Accounts { group: None, ..accounts() };
        assert_eq!(resolve("app", &no_group).unwrap(), user(1234, 2345, &[]), "no /etc/group: no additional groups");
        assert!(UserError::UnknownUser { user: "nobody".into() }.to_string().contains("nobody"));
    }

    #[test]
    fn files_are_read_inside_the_root_with_links_resolved_there() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(Accounts::read(root.path()).unwrap(), Accounts::default(), "no /etc: no files");
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        std::fs::write(root.path().join("usr/lib/passwd"), "app:x:7:8::/:/bin/sh\n").unwrap();
        // An absolute link resolves inside the root, not on the host.
        std::os::unix::fs::symlink("/usr/lib/passwd", root.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", root.path().join("etc/group")).unwrap();
        let a = Accounts::read(root.path()).unwrap();
        assert_eq!(a.passwd, Some(vec![PasswdEntry { name: "app".into(), uid: 7, gid: 8 }]));
        assert_eq!(a.group, None, "a link to a file the root lacks is no file (the host's is not read)");
    }

    #[test]
    fn read_only_mount_options_follow_containerd() {
        let overlay = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["index=off".into(), "workdir=/s/2/work".into(), "upperdir=/s/2/fs".into(), "lowerdir=/s/1/fs".into()],
        };
        let (flags, data) = read_only_options(&overlay);
        assert_eq!(flags, libc::MS_RDONLY);
        assert_eq!(data, "index=off,lowerdir=/s/2/fs:/s/1/fs", "the upper folder becomes the top lower one");
        let bind = Mount {
            r#type: "bind".into(),
            source: "/s/1/fs".into(),
            target: String::new(),
            options: vec!["rbind".into(), "rw".into()],
        };
        let (flags, data) = read_only_options(&bind);
        assert_eq!(flags, libc::MS_RDONLY | libc::MS_BIND | libc::MS_REC);
        assert_eq!(data, "");
    }

    #[test]
    fn a_snapshot_is_read_through_a_read_only_mount_that_is_removed_afterwards() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let (lower, upper) = (base.path().join("lower"), base.path().join("upper"));
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::create_dir_all(base.path().join("work")).unwrap();
        std::fs::write(lower.join("etc/passwd"), "app:x:1:1::/:/bin/sh\n").unwrap();
        std::fs::write(upper.join("etc/passwd"), "app:x:1234:2345::/:/bin/sh\n").unwrap();
        std::fs::write(lower.join("etc/group"), "extra:x:3456:app\n").unwrap();
        let option = |k: &str, p: &Path| format!("{k}={}", p.display());
        let mounts = [Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![option("workdir", &base.path().join("work")), option("upperdir", &upper), option("lowerdir", &lower)],
        }];
        let parent = base.path().join("mounts");
        std::fs::create_dir(&parent).unwrap();
        let resolved = resolve_in_snapshot_under(&parent, "app", "img", &mounts).unwrap();
        assert_eq!(resolved, user(1234, 2345, &[3456]), "the upper layer's passwd wins, the lower's group is seen");
        let err = resolve_in_snapshot_under(&parent, "nobody", "img", &mounts).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("nobody") && err.to_string().contains("img"), "{err}");
        assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0, "the temporary mount folders are gone");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(&parent.display().to_string()), "nothing left mounted: {mountinfo}");
        let bad = [Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![option("lowerdir", &base.path().join("missing"))],
        }];
        let err = resolve_in_snapshot_under(&parent, "app", "img", &bad).unwrap_err();
        assert!(err.to_string().contains("mounting its snapshot") && err.to_string().contains("img"), "{err}");
        assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0, "a failed mount leaves no folder");
    }
}
