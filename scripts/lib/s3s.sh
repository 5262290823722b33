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

# s3s-fs itself answers a ranged read by reading the object from its start (64 ranged reads of 8 MiB of a
# 512 MiB object took 90 s here, one whole read 3.3 s), as moto does. Restores read through nginx instead, which
# serves the same files (s3s-fs keeps each object as the file BUCKET/KEY) with ranges in place and the
# headers an S3 client reads (Content-Length, Content-Range, ETag, Last-Modified), path-style as S3 answers
# GET and HEAD; it checks no signature. nginx comes from Debian's package, unpacked into $NGINX_PREFIX.
NGINX_PREFIX=${CEDANA_NGINX_PREFIX:-/opt/cedana/nginx}

ensure_nginx() {
    [[ -x $NGINX_PREFIX/usr/sbin/nginx ]] && return 0
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download nginx >&2) || { rm -rf "$tmp"; return 1; }
    mkdir -p "$NGINX_PREFIX"
    dpkg -x "$tmp"/nginx_*.deb "$NGINX_PREFIX"
    rm -rf "$tmp"
    [[ -x $NGINX_PREFIX/usr/sbin/nginx ]]
}

# start_range_reader DIR: nginx on a free port of 127.0.0.1 serving DIR/data (the objects start_s3s_fs keeps);
# sets NGINX_PID and RANGE_ENDPOINT (give it as AWS_ENDPOINT_URL to a restore); returns 1 if it never answers.
start_range_reader() {
    local dir=$1 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$dir/nginx/tmp"
    cat >"$dir/nginx/nginx.conf" <<CONF
daemon off;
worker_processes 2;
user root;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    client_body_temp_path $dir/nginx/tmp/body;
    proxy_temp_path $dir/nginx/tmp/proxy;
    fastcgi_temp_path $dir/nginx/tmp/fastcgi;
    uwsgi_temp_path $dir/nginx/tmp/uwsgi;
    scgi_temp_path $dir/nginx/tmp/scgi;
    default_type application/octet-stream;
    server { listen 127.0.0.1:$port; root $dir/data; }
}
CONF
    "$NGINX_PREFIX/usr/sbin/nginx" -p "$dir/nginx" -c "$dir/nginx/nginx.conf" >"$dir/nginx/out.log" 2>&1 &
    NGINX_PID=$!
    RANGE_ENDPOINT=http://127.0.0.1:$port
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
