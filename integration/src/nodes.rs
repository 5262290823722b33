//! Two "nodes" on one machine for migration tests: each a network namespace with its own address on a
//! private bridge (no uplink), and between them, on the bridge's own address, what both can reach (an
//! S3-compatible server, a TCP peer). Everything is removed when dropped: the namespaces (and with them
//! their ends of the virtual links) and the bridge.
//!
//! ```text
//!   netns node-a (10.213.N.2, eth0) ──veth──┐
//!                                           ├── bridge cbPID (10.213.N.1): moto, peers
//!   netns node-b (10.213.N.3, eth0) ──veth──┘
//! ```

use std::process::Command;

/// One node: a network namespace with an address on the bridge.
pub struct Node {
    /// The node's name (its `node_name` in the configuration).
    pub name: String,
    /// The network namespace (`nsenter --net=/run/netns/NETNS ...`).
    pub netns: String,
    /// The node's address on the bridge.
    pub address: String,
}

impl Node {
    /// `nsenter --net=... PROGRAM`: a command that runs `program` on this node (in its network namespace
    /// only: unlike `ip netns exec`, which also gives it a mount namespace of its own that CRIU would then have
    /// to checkpoint).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(self.nsenter_arg()).arg("--").arg(program);
        cmd
    }

    /// `--net=/run/netns/NETNS`, nsenter's option that enters this node.
    pub fn nsenter_arg(&self) -> String {
        format!("--net=/run/netns/{}", self.netns)
    }

    /// Run `ip -n NETNS ARGS` (an `ip` command inside the node), which must succeed.
    pub fn ip(&self, args: &[&str]) {
        ip(&[&["-n", &self.netns][..], args].concat());
    }

    /// The inode of this node's network namespace, as /proc/PID/ns/net names it (`net:[INODE]`).
    pub fn netns_inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.netns)).expect("the node's netns file").ino()
    }
}

/// Two nodes and the bridge between them.
pub struct Nodes {
    pub a: Node,
    pub b: Node,
    /// The bridge's address, reachable from both nodes.
    pub gateway: String,
    /// The /24 the nodes are in, as `10.213.N`.
    pub subnet: String,
    bridge: String,
}

impl Nodes {
    /// Create the bridge and both nodes (as root); names and the subnet derive from this process's PID.
    pub fn new() -> Nodes {
        crate::require_root();
        // Unique per test of this process too (tests run in parallel).
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pid = std::process::id();
        let subnet = format!("10.213.{}", (pid * 7 + n) % 250);
        let tag = format!("{}{n}", pid % 1_000_000);
        let bridge = format!("cb{tag}");
        let gateway = format!("{subnet}.1");
        // Removes what was made so far if a step below fails (Nodes' own Drop takes over at the end).
        let partial = Partial { netns: [format!("cedana-{tag}-a"), format!("cedana-{tag}-b")], bridge: bridge.clone() };
        // A leftover of an earlier run with the same PID would make `ip link add` fail.
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let node = |letter: char, host: u8| {
            let netns = format!("cedana-{tag}-{letter}");
            let _ = Command::new("ip").args(["netns", "del", &netns]).output();
            ip(&["netns", "add", &netns]);
            let outside = format!("cv{tag}{letter}");
            let inside = format!("{outside}p");
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside]);
            ip(&["link", "set", &inside, "netns", &netns]);
            ip(&["-n", &netns, "link", "set", &inside, "name", "eth0"]);
            let address = format!("{subnet}.{host}");
            ip(&["-n", &netns, "addr", "add", &format!("{address}/24"), "dev", "eth0"]);
            ip(&["-n", &netns, "link", "set", "eth0", "up"]);
            ip(&["-n", &netns, "link", "set", "lo", "up"]);
            ip(&["link", "set", &outside, "master", &bridge]);
            ip(&["link", "set", &outside, "up"]);
            Node { name: format!("node-{letter}"), netns, address }
        };
        let a = node('a', 2);
        let b = node('b', 3);
        std::mem::forget(partial);
        Nodes { a, b, gateway, subnet, bridge }
    }

    /// Forget what the bridge learned of `address` (its neighbour entry), as after an address moved to another
    /// node: the next packet to it asks again who holds it.
    pub fn forget_neighbour(&self, address: &str) {
        let _ = Command::new("ip").args(["neigh", "del", address, "dev", &self.bridge]).output();
    }
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes::new()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for node in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", &node.netns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

/// What [`Nodes::new`] creates, removed if it fails half-way.
struct Partial {
    netns: [String; 2],
    bridge: String,
}

impl Drop for Partial {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) must be installed");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
