//! Network locking after a killed dump of a process with an established TCP connection (`dump process
//! --tcp-established`): CRIU 4.2.1 locks each connection with a netfilter rule (iptables by default: a DROP
//! rule in INPUT and OUTPUT for packets without its mark 0xc114; nftables: a table `CRIU-PID`) while it holds
//! the tree, and removes them when it lets the tree go. Killed while frozen, the `cedana` command or CRIU
//! itself must leave no such rule once the next command has started (CRIU removes its own when the command
//! dies; a killed CRIU leaves them, and the next start removes them), and the workload runs on, unfrozen. (A
//! CRIU killed while it holds the sockets in repair mode can break the connection: the workload may then end
//! on its own, which the test reports.)
//! Run as root: `cargo test -p cedana-integration --test faults_network -- --test-threads=1`.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::invariants::*;
use cedana_integration::workload::Workload;
use cedana_integration::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// MiB of memory of the workload: a dump of it lasts long enough to act while the network is locked.
const MIB: &str = "256";

#[derive(Debug, Clone, Copy)]
enum Victim {
    Cli,
    Criu,
}

/// The `pong N` numbers the tcp workload wrote.
fn pongs(w: &Workload) -> Vec<u64> {
    w.lines().iter().filter_map(|l| l.strip_prefix("pong ")?.parse().ok()).collect()
}

/// The connection still carries data: new pongs arrive.
fn assert_connection_works(w: &Workload, what: &str) {
    let n = pongs(w).len();
    wait_for(&format!("{what}: new pongs"), Duration::from_secs(30), || (pongs(w).len() >= n + 5).then_some(()));
}

fn finished(child: Child) -> String {
    String::from_utf8_lossy(&child.wait_with_output().expect("wait for cedana").stderr).into_owned()
}

/// A `--tcp-established` dump of the tcp workload (with `flags`, e.g. the lock method), `victim` SIGKILLed once
/// CRIU holds the tree and has locked its connection; afterwards, and after the next command's start, no lock
/// rule may be left.
fn kill_locked_dump(victim: Victim, flags: &[&str]) {
    require_root();
    // The rules are the machine's: the tests of this file take turns (libtest runs them on threads).
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    // Only the rules this test makes count (another run may have left some, which a start may sweep too).
    let before = network_lock_rules();
    let new = || -> Vec<String> { network_lock_rules().into_iter().filter(|r| !before.contains(r)).collect() };
    let scene = Scene::new();
    let w = Workload::start(&workload_bin("tcp"), &[MIB], &scene.work());
    wait_for("the first pongs", Duration::from_secs(60), || (pongs(&w).len() >= 3).then_some(()));
    let dest = scene.dest();
    let pid = w.pid.to_string();
    let dump = ["dump", "process", &pid, "--no-server", "--tcp-established", "--dir", dest.to_str().unwrap()];
    let child = scene
        .cedana(&[&dump[..], &["--compression", "gzip"], flags].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    wait_until_seized(w.pid, Duration::from_secs(30));
    let rules = wait_for_fast("CRIU to lock the connection", Duration::from_secs(30), || {
        let r = new();
        (!r.is_empty()).then_some(r)
    });
    if flags.contains(&"nftables") {
        assert!(rules.iter().all(|r| r.starts_with("nft: table inet CRIU-")), "{rules:?}");
    }
    eprintln!("{victim:?}: locked after {:?}: {rules:?}", started.elapsed());
    let mut killed = None;
    match victim {
        Victim::Cli => {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        }
        Victim::Criu => {
            let criu = wait_for_fast("CRIU", Duration::from_secs(10), || scene.criu_processes().first().copied());
            let _ = kill(Pid::from_raw(criu), Signal::SIGKILL);
            killed = Some(criu);
        }
    }
    let stderr = finished(child);
    scene.assert_no_criu();
    if let Some(criu) = killed {
        // Its descriptors close early in its exit, and the process may still be there (exiting) when the next
        // command starts: that one must not take it for a CRIU at work.
        eprintln!("{victim:?}: the killed CRIU {criu} is {:?}", status_field(criu, "State"));
    }
    if let Victim::Criu = victim {
        // A CRIU killed while it held the sockets in repair mode can break the connection: the workload may
        // then end on its own (an I/O error), which is no lock left behind. It must not be left frozen.
        let stuck = wait_for_value_or(SETTLE, || !alive(w.pid) || !frozen_or_traced(w.pid));
        assert!(stuck, "the workload is left {:?}", status_field(w.pid, "State"));
    } else {
        assert_running_unfrozen(w.pid);
    }
    let left = new();
    eprintln!("{victim:?}: lock rules left by the killed dump: {left:?} ({})", stderr.lines().last().unwrap_or_default());
    // The next command's start removes what a killed CRIU left; its dump works and locks and unlocks again.
    let survived = alive(w.pid);
    let out = scene.cedana(&[&dump[..], &["--leave-running"], flags].concat()).output().unwrap();
    let left = new();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(left.is_empty(), "{victim:?}: CRIU's lock rules left after the next start: {left:?}\n{stderr}");
    if survived && alive(w.pid) {
        assert!(out.status.success(), "{victim:?}: the next dump: {}", String::from_utf8_lossy(&out.stderr));
        assert_running_unfrozen(w.pid);
        assert_connection_works(&w, &format!("{victim:?}"));
    } else {
        assert!(matches!(victim, Victim::Criu), "{victim:?}: the workload must survive");
        // The exit code of the zombie (the last field of its stat): 3 or 4 an I/O error, else a signal.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", w.pid)).unwrap_or_default();
        let code = stat.split_whitespace().last().and_then(|c| c.parse::<i32>().ok());
        eprintln!(
            "{victim:?} {flags:?}: the workload ended after CRIU was killed (wait status {code:?}): {:?}",
            w.lines().last()
        );
    }
    scene.assert_no_temporaries();
    scene.assert_no_mounts();
}

#[test]
fn killing_the_cli_while_the_connection_is_locked_leaves_no_lock_rule() {
    kill_locked_dump(Victim::Cli, &[]);
    kill_locked_dump(Victim::Cli, &["--network-lock", "nftables"]);
}

#[test]
fn killing_criu_while_the_connection_is_locked_leaves_no_lock_rule_after_the_next_start() {
    // CRIU's default: iptables rules.
    kill_locked_dump(Victim::Criu, &[]);
    // Its nftables table.
    kill_locked_dump(Victim::Criu, &["--network-lock", "nftables"]);
}
