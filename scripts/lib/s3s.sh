# An S3-compatible server that answers ranged reads with the range alone (moto reads the whole object for
# each one), for benchmarks of restores from an object store: s3s-fs, objects as files under a folder.
# Sourced by scripts/bench-lazy.sh (not run).

S3S_VERSION=0.14.1
S3S_PREFIX=${CEDANA_S3S_PREFIX:-/opt/cedana/s3s}
S3S_BIN=$S3S_PREFIX/bin/s3s-fs

# ensure_s3s_fs: install s3s-fs $S3S_VERSION into $S3S_PREFIX with cargo (about 3 minutes of two cores, once;
# newer versions need a newer rustc than this machine's); nothing when it is there.
ensure_s3s_fs() {
    if [[ -x $S3S_BIN ]] && [[ $("$S3S_BIN" --version 2>/dev/null) == "s3s-fs $S3S_VERSION" ]]; then
        return 0
    fi
    echo "installing s3s-fs $S3S_VERSION into $S3S_PREFIX (cargo install, a few minutes once)" >&2
    cargo install "s3s-fs@$S3S_VERSION" --features binary --locked --root "$S3S_PREFIX" >&2
}

# start_s3s_fs DIR BUCKET: s3s-fs on a free port of 127.0.0.1 storing under DIR/data, with BUCKET; sets S3S_PID
# and exports the AWS_* variables cedana reads (dummy keys the server checks); returns 1 if it never answers.
start_s3s_fs() {
    local dir=$1 bucket=$2 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$dir/data/$bucket"
    "$S3S_BIN" --host 127.0.0.1 --port "$port" --access-key cedana-bench --secret-key cedana-bench-secret \
        "$dir/data" >"$dir/s3s.log" 2>&1 &
    S3S_PID=$!
    export AWS_ACCESS_KEY_ID=cedana-bench AWS_SECRET_ACCESS_KEY=cedana-bench-secret AWS_REGION=us-east-1
    export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ALLOW_HTTP=true
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
