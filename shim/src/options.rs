//! Runtime options from a Create request: the runc shim's `containerd.runc.v1.Options` (CRI's runtime
//! options table, or ctr with a runc runtime), or the legacy `containerd.linux.runc.CreateOptions` that
//! containerd 1.6's client sends for runtimes not named `io.containerd.runc.*` (no binary name in it).

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::oci::{CheckpointOptions as V2CheckpointOptions, Options};

use crate::error::{Error, Result};

const V2_OPTIONS: &str = "containerd.runc.v1.Options";
const V1_CREATE_OPTIONS: &str = "containerd.linux.runc.CreateOptions";
const V2_CHECKPOINT_OPTIONS: &str = "containerd.runc.v1.CheckpointOptions";
const V1_CHECKPOINT_OPTIONS: &str = "containerd.linux.runc.CheckpointOptions";

/// Options of a Checkpoint request, from the runc v2 type (`containerd.runc.v1.CheckpointOptions`) or the
/// legacy v1 type (`containerd.linux.runc.CheckpointOptions`). The two messages share their field numbers
/// except the last two: v2 has image_path = 8, work_path = 9; v1 has work_path = 8, image_path = 9.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointOptions {
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: Option<String>,
    pub image_path: Option<String>,
    pub work_path: Option<String>,
}

impl CheckpointOptions {
    pub fn decode(any: Option<&Any>) -> Result<CheckpointOptions> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(CheckpointOptions::default());
        };
        let legacy = any.type_url.ends_with(V1_CHECKPOINT_OPTIONS);
        if !legacy && !any.type_url.ends_with(V2_CHECKPOINT_OPTIONS) {
            return Err(Error::invalid(format!("unsupported checkpoint options type {}", any.type_url)));
        }
        let o = V2CheckpointOptions::parse_from_bytes(&any.value)
            .map_err(|e| Error::invalid(format!("checkpoint options ({}): {e}", any.type_url)))?;
        let (image_path, work_path) = if legacy { (o.work_path, o.image_path) } else { (o.image_path, o.work_path) };
        let some = |s: String| Some(s).filter(|s| !s.is_empty());
        Ok(CheckpointOptions {
            exit: o.exit,
            open_tcp: o.open_tcp,
            external_unix_sockets: o.external_unix_sockets,
            terminal: o.terminal,
            file_locks: o.file_locks,
            empty_namespaces: o.empty_namespaces,
            cgroups_mode: some(o.cgroups_mode),
            image_path: some(image_path),
            work_path: some(work_path),
        })
    }
}

/// The options this shim acts on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeOptions {
    pub binary_name: Option<String>,
    pub root: Option<String>,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
}

impl RuntimeOptions {
    pub fn decode(any: Option<&Any>) -> Result<RuntimeOptions> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(RuntimeOptions::default());
        };
        if any.type_url.ends_with(V2_OPTIONS) {
            let o = Options::parse_from_bytes(&any.value)
                .map_err(|e| Error::invalid(format!("runtime options ({}): {e}", any.type_url)))?;
            return Ok(RuntimeOptions {
                binary_name: Some(o.binary_name).filter(|b| !b.is_empty()),
                root: Some(o.root).filter(|r| !r.is_empty()),
                no_pivot_root: o.no_pivot_root,
                no_new_keyring: o.no_new_keyring,
            });
        }
        if any.type_url.ends_with(V1_CREATE_OPTIONS) {
            // Field 1 is no_pivot_root and field 8 no_new_keyring (both varints); the rest is for later slices.
            return Ok(legacy_flags(&any.value));
        }
        Err(Error::invalid(format!("unsupported runtime options type {}", any.type_url)))
    }
}

/// Read the two booleans we use from a legacy CreateOptions message, skipping everything else.
fn legacy_flags(bytes: &[u8]) -> RuntimeOptions {
    let mut out = RuntimeOptions::default();
    let mut is = containerd_shim_protos::protobuf::CodedInputStream::from_bytes(bytes);
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if wire == 0 {
            let Ok(v) = is.read_uint64() else { break };
            match field {
                1 => out.no_pivot_root = v != 0,
                8 => out.no_new_keyring = v != 0,
                _ => {}
            }
        } else {
            let Ok(wire) = containerd_shim_protos::protobuf::rt::WireType::new(wire).ok_or(()) else { break };
            if is.skip_field(wire).is_err() {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_options_give_the_binary_name() {
        let o = Options { binary_name: "/x/cedana-runc".into(), no_pivot_root: true, ..Default::default() };
        let any = Any {
            type_url: format!("types.containerd.io/{V2_OPTIONS}"),
            value: o.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let r = RuntimeOptions::decode(Some(&any)).unwrap();
        assert_eq!(r.binary_name.as_deref(), Some("/x/cedana-runc"));
        assert!(r.no_pivot_root);
    }

    #[test]
    fn legacy_options_are_accepted() {
        // no_pivot_root = true (field 1), shim_cgroup = "x" (field 9, bytes), no_new_keyring = true (field 8).
        let value = vec![0x08, 0x01, 0x4a, 0x01, b'x', 0x40, 0x01];
        let any = Any { type_url: V1_CREATE_OPTIONS.into(), value, ..Default::default() };
        let r = RuntimeOptions::decode(Some(&any)).unwrap();
        assert!(r.no_pivot_root && r.no_new_keyring);
        assert_eq!(r.binary_name, None);
    }

    #[test]
    fn checkpoint_options_of_both_types() {
        let o = V2CheckpointOptions {
            exit: true,
            file_locks: true,
            image_path: "/img".into(),
            work_path: "/work".into(),
            ..Default::default()
        };
        let value = o.write_to_bytes().unwrap();
        let v2 =
            Any { type_url: format!("types.containerd.io/{V2_CHECKPOINT_OPTIONS}"), value: value.clone(), ..Default::default() };
        let c = CheckpointOptions::decode(Some(&v2)).unwrap();
        assert!(c.exit && c.file_locks && !c.open_tcp);
        assert_eq!((c.image_path.as_deref(), c.work_path.as_deref()), (Some("/img"), Some("/work")));
        // The same bytes as the legacy type: fields 8 and 9 are swapped there.
        let v1 = Any { type_url: format!("types.containerd.io/{V1_CHECKPOINT_OPTIONS}"), value, ..Default::default() };
        let c = CheckpointOptions::decode(Some(&v1)).unwrap();
        assert_eq!((c.image_path.as_deref(), c.work_path.as_deref()), (Some("/work"), Some("/img")));
        // Hand-encoded legacy: exit (1), image_path "/i" (9).
        let v1 =
            Any { type_url: V1_CHECKPOINT_OPTIONS.into(), value: vec![0x08, 0x01, 0x4a, 0x02, b'/', b'i'], ..Default::default() };
        let c = CheckpointOptions::decode(Some(&v1)).unwrap();
        assert!(c.exit);
        assert_eq!((c.image_path.as_deref(), c.work_path), (Some("/i"), None));
        assert_eq!(CheckpointOptions::decode(None).unwrap(), CheckpointOptions::default());
        let bad = Any { type_url: "x.y.Z".into(), ..Default::default() };
        assert_eq!(CheckpointOptions::decode(Some(&bad)).unwrap_err().kind, crate::error::Kind::InvalidArgument);
    }

    #[test]
    fn none_and_unknown() {
        assert_eq!(RuntimeOptions::decode(None).unwrap(), RuntimeOptions::default());
        let any = Any { type_url: "x.y.Z".into(), ..Default::default() };
        assert_eq!(RuntimeOptions::decode(Some(&any)).unwrap_err().kind, crate::error::Kind::InvalidArgument);
    }
}
