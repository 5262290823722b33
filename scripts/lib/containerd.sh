# Shared by scripts/demo.sh and scripts/bench-containerd.sh (sourced, not run).

# start_private_containerd DIR: a containerd with its root, state and sockets under DIR (the CRI plugin off),
# logging to DIR/containerd.log; sets CONTAINERD_PID and waits until it answers (returns 1 if it never does).
start_private_containerd() {
    local dir=$1
    mkdir -p "$dir"
    cat >"$dir/config.toml" <<CONF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
CONF
    containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
    CONTAINERD_PID=$!
    for _ in $(seq 100); do
        ctr -a "$dir/containerd.sock" version >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

# busybox_rootfs DIR: /bin/busybox with its applets, and the usual empty mount points.
busybox_rootfs() {
    local dir=$1
    mkdir -p "$dir/bin" "$dir/"{proc,sys,dev,tmp,etc}
    cp /bin/busybox "$dir/bin/busybox"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$dir/bin/$a"; done
}
