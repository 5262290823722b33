//! CRIU's RPC messages (`images/rpc.proto` of CRIU, proto2), written by hand: only the messages and fields
//! the swrk driver uses. Field numbers, types and defaults follow the .proto exactly; a field left out here
//! is simply never sent (and skipped when received).

/// `criu_req_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CriuReqType {
    Empty = 0,
    Dump = 1,
    Restore = 2,
    Check = 3,
    PreDump = 4,
    PageServer = 5,
    Notify = 6,
    CpuinfoDump = 7,
    CpuinfoCheck = 8,
    FeatureCheck = 9,
    Version = 10,
    WaitPid = 11,
    PageServerChld = 12,
    SinglePreDump = 13,
}

/// `criu_cg_mode`: how CRIU manages cgroups (`--manage-cgroups=MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CriuCgMode {
    Ignore = 0,
    CgNone = 1,
    Props = 2,
    Soft = 3,
    Full = 4,
    Strict = 5,
    Default = 6,
}

/// `criu_network_lock_method` (`--network-lock METHOD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CriuNetworkLockMethod {
    Iptables = 1,
    Nftables = 2,
    Skip = 3,
}

/// `inherit_fd`: the resource `key` (as named in the images, e.g. `pipe:[1234]`) is the criu process's own
/// descriptor `fd` (swrk only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct InheritFd {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(int32, required, tag = "2")]
    pub fd: i32,
}

/// `criu_opts`: the options of a request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuOpts {
    /// Required; resolved by CRIU as `/proc/<peer>/fd/<N>`, the peer being the socket's SO_PEERCRED process.
    #[prost(int32, required, tag = "1", default = "-1")]
    pub images_dir_fd: i32,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
    #[prost(bool, optional, tag = "3")]
    pub leave_running: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub ext_unix_sk: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    pub tcp_established: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub evasive_devices: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub shell_job: Option<bool>,
    #[prost(bool, optional, tag = "8")]
    pub file_locks: Option<bool>,
    #[prost(int32, optional, tag = "9", default = "2")]
    pub log_level: Option<i32>,
    /// A file name in the work dir (no `/` allowed).
    #[prost(string, optional, tag = "10")]
    pub log_file: Option<String>,
    #[prost(bool, optional, tag = "12")]
    pub notify_scripts: Option<bool>,
    #[prost(int32, optional, tag = "17")]
    pub work_dir_fd: Option<i32>,
    #[prost(bool, optional, tag = "18")]
    pub link_remap: Option<bool>,
    /// Restore the root as a sibling of CRIU (a child of CRIU's parent); swrk only.
    #[prost(bool, optional, tag = "26")]
    pub rst_sibling: Option<bool>,
    #[prost(message, repeated, tag = "27")]
    pub inherit_fd: Vec<InheritFd>,
    #[prost(enumeration = "CriuCgMode", optional, tag = "34")]
    pub manage_cgroups_mode: Option<i32>,
    /// Bytes.
    #[prost(uint32, optional, tag = "35", default = "1048576")]
    pub ghost_limit: Option<u32>,
    #[prost(string, repeated, tag = "37")]
    pub external: Vec<String>,
    /// Seconds.
    #[prost(uint32, optional, tag = "45")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "46")]
    pub tcp_skip_in_flight: Option<bool>,
    /// A CRIU configuration file read after the RPC options, overriding them.
    #[prost(string, optional, tag = "51")]
    pub config_file: Option<String>,
    #[prost(bool, optional, tag = "52")]
    pub tcp_close: Option<bool>,
    #[prost(enumeration = "CriuNetworkLockMethod", optional, tag = "64", default = "Iptables")]
    pub network_lock: Option<i32>,
}

/// `criu_dump_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuDumpResp {
    #[prost(bool, optional, tag = "1")]
    pub restored: Option<bool>,
}

/// `criu_restore_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuRestoreResp {
    #[prost(int32, required, tag = "1")]
    pub pid: i32,
}

/// `criu_notify`: CRIU reached the point of one of its action scripts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuNotify {
    #[prost(string, optional, tag = "1")]
    pub script: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
}

/// `criu_req`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuReq {
    #[prost(enumeration = "CriuReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub opts: Option<CriuOpts>,
    #[prost(bool, optional, tag = "3")]
    pub notify_success: Option<bool>,
}

/// `criu_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriuResp {
    #[prost(enumeration = "CriuReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(bool, required, tag = "2")]
    pub success: bool,
    #[prost(message, optional, tag = "3")]
    pub dump: Option<CriuDumpResp>,
    #[prost(message, optional, tag = "4")]
    pub restore: Option<CriuRestoreResp>,
    #[prost(message, optional, tag = "5")]
    pub notify: Option<CriuNotify>,
    #[prost(int32, optional, tag = "7")]
    pub cr_errno: Option<i32>,
    #[prost(string, optional, tag = "9")]
    pub cr_errmsg: Option<String>,
}

impl CriuReq {
    /// A DUMP or RESTORE request with these options.
    pub fn with_opts(kind: CriuReqType, opts: CriuOpts) -> Self {
        Self { r#type: kind as i32, opts: Some(opts), notify_success: None }
    }

    /// The answer to a NOTIFY response.
    pub fn notify_answer(ok: bool) -> Self {
        Self { r#type: CriuReqType::Notify as i32, opts: None, notify_success: Some(ok) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn options_round_trip() {
        let opts = CriuOpts {
            images_dir_fd: 7,
            pid: Some(1234),
            log_level: Some(4),
            log_file: Some("dump.log".into()),
            notify_scripts: Some(true),
            work_dir_fd: Some(8),
            rst_sibling: Some(true),
            inherit_fd: vec![InheritFd { key: "pipe:[99]".into(), fd: 1 }],
            external: vec!["mnt[/a]:a".into()],
            tcp_skip_in_flight: Some(true),
            config_file: Some("/w/dump.conf".into()),
            tcp_close: Some(false),
            evasive_devices: Some(true),
            manage_cgroups_mode: Some(CriuCgMode::CgNone as i32),
            ghost_limit: Some(10 << 20),
            timeout: Some(5),
            network_lock: Some(CriuNetworkLockMethod::Skip as i32),
            ..CriuOpts::default()
        };
        let req = CriuReq::with_opts(CriuReqType::Dump, opts);
        let bytes = req.encode_to_vec();
        assert_eq!(CriuReq::decode(bytes.as_slice()).unwrap(), req);
    }

    #[test]
    fn known_tags_and_required_fields_are_on_the_wire() {
        // criu_req { type = NOTIFY (field 1, varint 6), notify_success = true (field 3, varint 1) }
        assert_eq!(CriuReq::notify_answer(true).encode_to_vec(), [0x08, 0x06, 0x18, 0x01]);
        // images_dir_fd is `required ... [default = -1]`: sent even at its default (int32 -1 is a 10-byte varint).
        let bytes = CriuOpts::default().encode_to_vec();
        assert_eq!(bytes[0], 0x08);
        assert_eq!(bytes.len(), 11);
        // log_level defaults to 2 when absent, like CRIU's generated code.
        assert_eq!(CriuOpts::default().log_level(), 2);
        // ... and so do ghost_limit (1 MiB) and network_lock (IPTABLES).
        let d = CriuOpts::default();
        assert_eq!((d.ghost_limit(), d.network_lock()), (1 << 20, CriuNetworkLockMethod::Iptables));
        // network_lock is field 64, varint: key (64 << 3) = 512 = 0x80 0x04; SKIP = 3.
        let o = CriuOpts { images_dir_fd: 3, network_lock: Some(CriuNetworkLockMethod::Skip as i32), ..CriuOpts::default() };
        assert_eq!(o.encode_to_vec(), [0x08, 0x03, 0x80, 0x04, 0x03]);
        // rst_sibling is field 26, varint: key (26 << 3) = 208 = 0xd0 0x01.
        let o = CriuOpts { images_dir_fd: 3, rst_sibling: Some(true), ..CriuOpts::default() };
        assert_eq!(o.encode_to_vec(), [0x08, 0x03, 0xd0, 0x01, 0x01]);
    }

    #[test]
    fn a_restore_response_decodes() {
        // What CRIU sends after a restore: type RESTORE, success, restore { pid = 4321 }.
        let bytes = [0x08, 0x02, 0x10, 0x01, 0x22, 0x03, 0x08, 0xe1, 0x21];
        let resp = CriuResp::decode(&bytes[..]).unwrap();
        assert_eq!(resp.r#type(), CriuReqType::Restore);
        assert!(resp.success);
        assert_eq!(resp.restore.map(|r| r.pid), Some(4321));
        // A notify with a field this module does not define (criu_resp.status = 11) is still read.
        let notify = CriuResp {
            r#type: CriuReqType::Notify as i32,
            success: true,
            notify: Some(CriuNotify { script: Some("post-dump".into()), pid: None }),
            ..CriuResp::default()
        };
        let mut bytes = notify.encode_to_vec();
        bytes.extend([0x58, 0x05]);
        assert_eq!(CriuResp::decode(bytes.as_slice()).unwrap(), notify);
    }
}
