#!/usr/bin/env bash
# Sets up everything cedana-rs needs on a Debian 12 (bookworm) machine. Idempotent: a run with
# everything present takes well under a second or two.
#
#   1. Debian packages from the system's own apt sources (bookworm): container engines, compressors,
#      tools used by tests and benchmarks.
#   2. CRIU >= 4.2 in a private prefix (default /opt/cedana/criu, env CEDANA_CRIU_PREFIX), taken from
#      Debian's `forky` suite through a private apt configuration, so that the system's apt state,
#      glibc and compiler runtime stay untouched. bookworm's criu 3.17 fails on this kernel
#      ("vdso: Unexpected rt vDSO area bounds") and trixie's 4.1.1 cannot dump sockets; see
#      FIELD-NOTES "CRIU: use 4.2 or newer". The binary is linked as /usr/local/sbin/criu so that
#      runc and containerd find it on PATH.
#   3. containerd 2.x (containerd, ctr, containerd-shim-runc-v2) and the runc of the same suite in a
#      private prefix (default /opt/cedana/containerd2, binaries in bin/, env
#      CEDANA_CONTAINERD2_PREFIX), from Debian's `forky` through the same private apt configuration
#      and patched the same way as CRIU, for the CRI tests against containerd 2.x (bookworm has 1.6).
#      Nothing of it goes on the system's PATH; the system's containerd and runc stay as they are.
#   4. moto (an S3-compatible server, from PyPI) in a Python venv of its own (default
#      /opt/cedana/moto, env CEDANA_MOTO_VENV), for the object-storage tests: they run
#      $CEDANA_MOTO_VENV/bin/moto_server. No S3 server is packaged in Debian bookworm.
#   5. Debian's docker-registry (the Distribution registry) unpacked into a private prefix (default
#      /opt/cedana/registry, env CEDANA_REGISTRY_PREFIX), nothing installed or started system-wide: the
#      CRI test against containerd 2.x serves its base image from it on 127.0.0.1 (containerd 2.x pulls a
#      checkpoint's base image by digest when it restores a CRI checkpoint archive).
#   6. gcp-storage-emulator (a Google Cloud Storage emulator, from PyPI) in a Python venv of its own
#      (default /opt/cedana/gcs-emulator, env CEDANA_GCS_EMULATOR_VENV), for the GCS tests: they run
#      $CEDANA_GCS_EMULATOR_VENV/bin/gcp-storage-emulator behind a small adapter of the integration crate
#      (integration/src/gcs.rs says why).
#   7. A summary, and `criu check`.
#
# Environment:
#   CEDANA_CRIU_PREFIX   where CRIU goes (default /opt/cedana/criu)
#   CEDANA_CRIU_SUITE    Debian suite to take CRIU from (default forky)
#   CEDANA_DEBIAN_MIRROR Debian archive URL (default: read from the system's apt sources,
#                        falling back to http://deb.debian.org/debian)
#   CEDANA_CRIU_FORCE=1  rebuild the CRIU prefix even if a good one is present
#   CEDANA_CONTAINERD2_PREFIX  where containerd 2.x and its runc go (default /opt/cedana/containerd2)
#   CEDANA_CONTAINERD2_SUITE   Debian suite to take them from (default forky)
#   CEDANA_CONTAINERD2_FORCE=1 rebuild that prefix even if a good one is present
#   CEDANA_MOTO_VENV     where moto's venv goes (default /opt/cedana/moto)
#   CEDANA_REGISTRY_PREFIX  where docker-registry is unpacked (default /opt/cedana/registry)
#   CEDANA_GCS_EMULATOR_VENV  where gcp-storage-emulator's venv goes (default /opt/cedana/gcs-emulator)
set -euo pipefail

START_NS=$(date +%s%N)
PREFIX=${CEDANA_CRIU_PREFIX:-/opt/cedana/criu}
PREFIX=${PREFIX%/}
CRIU_SUITE=${CEDANA_CRIU_SUITE:-forky}
CRIU_MIN_VERSION=4.2
CRIU_LINK=/usr/local/sbin/criu
CONTAINERD2_PREFIX=${CEDANA_CONTAINERD2_PREFIX:-/opt/cedana/containerd2}
CONTAINERD2_PREFIX=${CONTAINERD2_PREFIX%/}
CONTAINERD2_SUITE=${CEDANA_CONTAINERD2_SUITE:-forky}
CONTAINERD2_MIN_VERSION=2.0
CONTAINERD2_BINS=(containerd ctr containerd-shim-runc-v2 runc)
MOTO_VENV=${CEDANA_MOTO_VENV:-/opt/cedana/moto}
MOTO_VENV=${MOTO_VENV%/}
REGISTRY_PREFIX=${CEDANA_REGISTRY_PREFIX:-/opt/cedana/registry}
REGISTRY_PREFIX=${REGISTRY_PREFIX%/}
GCS_EMULATOR_VENV=${CEDANA_GCS_EMULATOR_VENV:-/opt/cedana/gcs-emulator}
GCS_EMULATOR_VENV=${GCS_EMULATOR_VENV%/}
# Pinned, so that every machine tests against the same server.
MOTO_REQUIREMENT='moto[server]==5.2.1'
GCS_EMULATOR_REQUIREMENT='gcp-storage-emulator==2026.7.19'

APT_PACKAGES=(
  iptables nftables runc containerd docker.io busybox-static patchelf zstd gzip lz4 procps iproute2
  python3 python3-venv hyperfine gcc libc6-dev
)

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ $PREFIX == /* ]] || die "CEDANA_CRIU_PREFIX must be an absolute path (got '$PREFIX')"
[[ $CONTAINERD2_PREFIX == /* ]] || die "CEDANA_CONTAINERD2_PREFIX must be an absolute path (got '$CONTAINERD2_PREFIX')"
[[ $MOTO_VENV == /* ]] || die "CEDANA_MOTO_VENV must be an absolute path (got '$MOTO_VENV')"

# Serialize concurrent runs (e.g. two test jobs calling setup at once).
LOCK_DIR=/run/lock
[[ -d $LOCK_DIR && -w $LOCK_DIR ]] || LOCK_DIR=/tmp
exec 9>"$LOCK_DIR/cedana-setup.lock"
flock 9

# Cleanup actions registered by the steps below, run on every exit.
CLEANUP=()
cleanup() {
  local i
  for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" || true; done
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------------
pkg_installed() {
  [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

install_apt_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    pkg_installed "$p" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "Debian packages: all ${#APT_PACKAGES[@]} present"
    return
  fi
  log "Debian packages: installing ${missing[*]}"
  # Never let a package's maintainer script start a service (docker.io, containerd): PID 1 is not
  # systemd here, and the tests start the daemons themselves with private state. Keep an existing
  # policy-rc.d (e.g. Docker-built images ship one); only remove the one we created.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# temporary, created by cedana-rs scripts/setup.sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    CLEANUP+=("rm -f /usr/sbin/policy-rc.d")
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || log "warning: apt-get update reported errors; trying the install anyway"
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  for p in "${missing[@]}"; do
    pkg_installed "$p" || die "package $p is still not installed"
  done
  if [[ -n ${CLEANUP[*]-} && ${CLEANUP[-1]} == "rm -f /usr/sbin/policy-rc.d" ]]; then
    rm -f /usr/sbin/policy-rc.d
    unset 'CLEANUP[-1]'
  fi
}

# ---------------------------------------------------------------------------------------------
# 2. CRIU >= 4.2 in a private prefix
# ---------------------------------------------------------------------------------------------

# Prints the version reported by `$1 --version` (empty if it does not run).
criu_version() {
  local out
  out=$("$@" --version 2>/dev/null) || return 0
  awk '/^Version:/ { print $2; exit }' <<<"$out"
}

version_ok() { [[ -n $1 ]] && dpkg --compare-versions "$1" ge "$CRIU_MIN_VERSION"; }

# The Debian archive URL this machine uses: the first enabled apt source whose URL is a plain
# Debian archive (path ending in /debian), from one-line .list files and deb822 .sources files.
# Arg: a scratch file for the candidate list.
debian_mirror() {
  if [[ -n ${CEDANA_DEBIAN_MIRROR:-} ]]; then
    echo "${CEDANA_DEBIAN_MIRROR%/}"
    return
  fi
  local files=() f uri
  [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] && files+=("$f")
  done
  for f in "${files[@]}"; do
    if [[ $f == *.sources ]]; then
      # deb822: stanzas separated by blank lines; skip stanzas with "Enabled: no".
      awk '
        function flush() { if (!disabled) for (i = 1; i <= n; i++) print u[i]; n = 0; disabled = 0 }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        tolower($1) == "enabled:" && tolower($2) == "no" { disabled = 1 }
        tolower($1) == "uris:" { for (j = 2; j <= NF; j++) u[++n] = $j }
        END { flush() }
      ' "$f"
    else
      # one-line format: deb [options] URI suite components
      awk '
        /^[ \t]*deb[ \t]/ {
          i = 2
          if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
          print $i
        }
      ' "$f"
    fi
  done >"$1"
  while read -r uri; do
    uri=${uri%/}
    if [[ $uri =~ ^(https?|ftp)://[^/]+(/.*)?/debian$ ]]; then
      echo "$uri"
      return
    fi
  done <"$1"
  echo "http://deb.debian.org/debian"
}

# Lists what `$1` loads, via its own dynamic loader (what ldd does, but with the right ld.so).
# Args: loader binary; prints the list, fails on "not found".
list_libs() {
  local loader=$1 bin=$2 out
  out=$("$loader" --list "$bin" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
  printf '%s\n' "$out"
}

# Checks that everything `bin` loads comes from `libdir` (and nothing is missing).
check_libs_confined() {
  local loader=$1 bin=$2 libdir=$3 out bad
  out=$(list_libs "$loader" "$bin") || return 1
  bad=$(awk -v d="$libdir/" '
    /not found/ { print; next }
    /=>/ { if (index($3, d) != 1) print; next }
    $1 ~ /^\// { if (index($1, d) != 1) print }
  ' <<<"$out")
  if [[ -n $bad ]]; then
    log "libraries resolved outside $libdir:"
    printf '%s\n' "$bad" >&2
    return 1
  fi
}

# Private apt: packages of another Debian suite, downloaded and unpacked without touching the system's
# apt or dpkg state. Args: a label for the log, a scratch folder (made by the caller, removed by it), the
# suite, the packages. The whole dependency closure ends up unpacked in SCRATCH/staging.
private_apt_fetch() {
  local label=$1 scratch=$2 suite=$3
  shift 3
  local arch mirror keyring deb n
  arch=$(dpkg --print-architecture)
  mirror=$(debian_mirror "$scratch/uris")
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [[ -r $keyring ]] || die "$keyring is missing (package debian-archive-keyring)"
  log "$label: fetching $* from $mirror $suite ($arch) with a private apt configuration"
  chmod 755 "$scratch" # apt downloads as the _apt user, which must reach partial/
  mkdir -p "$scratch"/{apt.conf.d,sources.list.d,preferences.d,lists/partial,cache/archives/partial,staging}
  : >"$scratch/status"
  # The suite is signed by the Debian archive keys (bookworm's debian-archive-keyring has the
  # bookworm and trixie archive keys, which sign forky as of 2025); signatures are checked.
  printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite" >"$scratch/sources.list"
  # A configuration of its own: the system's apt.conf.d is not read (its update hooks, AppStream
  # index targets and so on would touch or slow the system). Only the system's download settings
  # (Acquire::*: proxies, timeouts, TLS, Check-Valid-Until, ...) are carried over, minus index
  # targets and languages. The empty dpkg status makes apt resolve the packages' whole dependency
  # closure and download all of it.
  {
    apt-config dump 2>/dev/null \
      | grep -E '^Acquire::' \
      | grep -vE '^Acquire::(IndexTargets|Languages|Changelogs|CompressionTypes|cdrom)(::| )' \
      | grep -v ' "";$' || true
    cat <<EOF
Dir::Etc::Main "/dev/null";
Dir::Etc::Parts "$scratch/apt.conf.d";
Dir::Etc::SourceList "$scratch/sources.list";
Dir::Etc::SourceParts "$scratch/sources.list.d";
Dir::Etc::Preferences "$scratch/preferences";
Dir::Etc::PreferencesParts "$scratch/preferences.d";
Dir::State "$scratch";
Dir::State::Lists "$scratch/lists";
Dir::State::status "$scratch/status";
Dir::State::extended_states "$scratch/extended_states";
Dir::Cache "$scratch/cache";
Dir::Log "$scratch";
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
  } >"$scratch/apt.conf"

  (
    export APT_CONFIG=$scratch/apt.conf DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q --download-only --no-install-recommends "$@"
  ) >"$scratch/apt.log" 2>&1 || { cat "$scratch/apt.log" >&2; die "private apt could not fetch $*"; }

  n=0
  for deb in "$scratch"/cache/archives/*.deb; do
    [[ -f $deb ]] || continue
    dpkg-deb -x "$deb" "$scratch/staging"
    n=$((n + 1))
  done
  ((n > 0)) || die "no packages were downloaded"
  log "$label: unpacked $n packages ($(du -sh "$scratch/cache/archives" | cut -f1)): $(
    cd "$scratch/cache/archives" && ls -- *.deb | sed 's/_.*//' | tr '\n' ' '
  )"
}

# Copies the shared libraries of the unpacked packages (SCRATCH/staging) into DEST (made by the caller):
# the files directly in the library dirs (not plugin subdirs such as gconv/), flattened. Symlinks are
# re-created by basename (some are absolute, e.g. /lib64/ld-linux-x86-64.so.2, and must not resolve to
# the system's files). Also records the package list in DEST/../PACKAGES.
stage_libs() {
  local scratch=$1 dest=$2 triplet d f t changed
  triplet=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
  local libdirs=()
  for d in lib lib64 usr/lib usr/lib64 "lib/$triplet" "usr/lib/$triplet"; do
    [[ -d $scratch/staging/$d ]] && libdirs+=("$scratch/staging/$d")
  done
  find "${libdirs[@]}" -maxdepth 1 -type f \( -name '*.so' -o -name '*.so.*' \) \
    -exec cp -p -t "$dest" {} +
  changed=1
  while ((changed)); do
    changed=0
    while IFS= read -r f; do
      [[ -e $dest/${f##*/} || -L $dest/${f##*/} ]] && continue
      t=$(basename "$(readlink "$f")")
      if [[ -e $dest/$t ]]; then
        ln -s "$t" "$dest/${f##*/}"
        changed=1
      fi
    done < <(find "${libdirs[@]}" -maxdepth 1 -type l \( -name '*.so' -o -name '*.so.*' \))
  done
  # Record what went in, for the curious.
  (cd "$scratch/cache/archives" && ls -- *.deb) >"$(dirname "$dest")/PACKAGES"
}

# Whether an ELF file asks for a dynamic loader (Go binaries may be static).
is_dynamic() { patchelf --print-interpreter "$1" >/dev/null 2>&1; }

# Points a dynamic binary at the loader INTERP and the libraries in LIBDIR. --force-rpath: a DT_RUNPATH
# would not be used for the libraries' own dependencies (criu then misses libunistring.so.5).
patch_binary() {
  local bin=$1 libdir=$2 interp=$3
  patchelf --set-interpreter "$libdir/$interp" --force-rpath --set-rpath "$libdir" "$bin"
}

# Moves a prefix built and verified at NEW to PREFIX: the dynamic binaries (paths relative to the
# prefix) are patched for PREFIX's lib/, the folders swapped, and CHECK (a function taking the prefix)
# run again; on failure the previous prefix comes back. Args: label, new, prefix, interp, check, bins...
swap_prefix() {
  local label=$1 new=$2 prefix=$3 interp=$4 check=$5 old=$3.old b
  shift 5
  for b in "$@"; do
    if is_dynamic "$new/$b"; then patch_binary "$new/$b" "$prefix/lib" "$interp"; fi
  done
  rm -rf "$old"
  mkdir -p "$(dirname "$prefix")"
  if [[ -e $prefix ]]; then mv -T "$prefix" "$old"; fi
  mv -T "$new" "$prefix"
  if ! "$check" "$prefix"; then
    log "$label: the installed copy fails, rolling back"
    rm -rf "$prefix"
    [[ -e $old ]] && mv -T "$old" "$prefix"
    die "$prefix does not work after the swap"
  fi
  rm -rf "$old"
}

# Whether PREFIX/criu is good: its version, and every library from PREFIX/lib.
criu_prefix_ok() {
  local p=$1 interp
  interp=$(cat "$p/.interp" 2>/dev/null || echo none)
  version_ok "$(criu_version "$p/criu")" && check_libs_confined "$p/lib/$interp" "$p/criu" "$p/lib"
}

install_criu() {
  local v
  v=$(criu_version "$PREFIX/criu")
  if [[ ${CEDANA_CRIU_FORCE:-0} != 1 ]] && version_ok "$v" && criu_prefix_ok "$PREFIX" 2>/dev/null; then
    log "CRIU: $PREFIX/criu $v present"
    return
  fi
  [[ -n $v ]] && log "CRIU: $PREFIX/criu reports '$v', rebuilding"
  command -v patchelf >/dev/null || die "patchelf is missing"

  local scratch new interp src_criu
  scratch=$(mktemp -d /var/tmp/cedana-criu.XXXXXX)
  CLEANUP+=("rm -rf '$scratch'")
  private_apt_fetch CRIU "$scratch" "$CRIU_SUITE" criu

  src_criu=$scratch/staging/usr/sbin/criu
  [[ -f $src_criu ]] || die "criu binary not found in the unpacked packages"
  interp=$(basename "$(patchelf --print-interpreter "$src_criu")")

  new=$PREFIX.new
  rm -rf "$new" "$PREFIX.old"
  mkdir -p "$new/lib"
  CLEANUP+=("rm -rf '$new'")
  stage_libs "$scratch" "$new/lib"
  [[ -f $new/lib/$interp ]] || die "dynamic loader $interp not found in the unpacked packages"
  echo "$interp" >"$new/.interp"

  cp -p "$src_criu" "$new/criu"
  # First patch for PREFIX.new and verify there; then patch for the final PREFIX, swap, verify
  # again, and roll back if that fails.
  patch_binary "$new/criu" "$new/lib" "$interp"
  v=$(criu_version "$new/criu")
  version_ok "$v" || die "$new/criu reports version '$v', need >= $CRIU_MIN_VERSION"
  check_libs_confined "$new/lib/$interp" "$new/criu" "$new/lib" || die "$new/criu is not self-contained"

  swap_prefix CRIU "$new" "$PREFIX" "$interp" criu_prefix_ok criu
  v=$(criu_version "$PREFIX/criu")
  log "CRIU: installed $PREFIX/criu $v"
}

# runc (`criu swrk`) and containerd look criu up on PATH.
link_criu() {
  if [[ $(readlink "$CRIU_LINK" 2>/dev/null || true) != "$PREFIX/criu" ]]; then
    mkdir -p "$(dirname "$CRIU_LINK")"
    ln -sfn "$PREFIX/criu" "$CRIU_LINK.tmp.$$"
    mv -Tf "$CRIU_LINK.tmp.$$" "$CRIU_LINK"
    log "CRIU: linked $CRIU_LINK -> $PREFIX/criu"
  fi
  # /usr/local/sbin comes first in Debian's default PATH; say so if something else would win.
  local std_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin found
  for path in "$std_path" "$PATH"; do
    found=$(PATH=$path command -v criu || true)
    if [[ $found != "$CRIU_LINK" ]]; then
      log "warning: with PATH=$path, 'criu' resolves to '${found:-nothing}', not $CRIU_LINK"
    fi
  done
  if [[ -e /usr/sbin/criu ]]; then
    log "note: /usr/sbin/criu ($(criu_version /usr/sbin/criu || true)) exists and is shadowed by $CRIU_LINK"
  fi
}

# ---------------------------------------------------------------------------------------------
# 3. containerd 2.x and its runc in a private prefix
# ---------------------------------------------------------------------------------------------

# The version `containerd --version` reports ("containerd github.com/containerd/containerd/v2 2.1.9+ds1
# ..."), empty if it does not run.
containerd_version() {
  local out
  out=$("$1" --version 2>/dev/null) || return 0
  awk '$1 == "containerd" { print $3; exit }' <<<"$out"
}

# The version `runc --version` reports ("runc version 1.3.6+ds1"), empty if it does not run.
runc_version() {
  local out
  out=$("$1" --version 2>/dev/null) || return 0
  awk '$1 == "runc" && $2 == "version" { print $3; exit }' <<<"$out"
}

containerd2_version_ok() {
  [[ -n $1 ]] && dpkg --compare-versions "$1" ge "$CONTAINERD2_MIN_VERSION" && dpkg --compare-versions "$1" lt 3~
}

# Whether PREFIX holds a working containerd 2.x and runc: versions, and every library of every dynamic
# binary from PREFIX/lib.
containerd2_prefix_ok() {
  local p=$1 interp b
  containerd2_version_ok "$(containerd_version "$p/bin/containerd")" || return 1
  [[ -n $(runc_version "$p/bin/runc") ]] || return 1
  "$p/bin/ctr" --version >/dev/null 2>&1 || return 1
  "$p/bin/containerd-shim-runc-v2" -v >/dev/null 2>&1 || return 1
  interp=$(cat "$p/.interp" 2>/dev/null || echo none)
  for b in "${CONTAINERD2_BINS[@]}"; do
    if is_dynamic "$p/bin/$b"; then check_libs_confined "$p/lib/$interp" "$p/bin/$b" "$p/lib" || return 1; fi
  done
}

# For the CRI tests against containerd 2.x (CheckpointContainer is implemented there): bookworm has
# 1.6 only. containerd, ctr, containerd-shim-runc-v2 and the runc of the same suite go to
# CONTAINERD2_PREFIX/bin; nothing is put on the system's PATH (the tests use the prefix explicitly).
install_containerd2() {
  local p=$CONTAINERD2_PREFIX v
  v=$(containerd_version "$p/bin/containerd")
  if [[ ${CEDANA_CONTAINERD2_FORCE:-0} != 1 ]] && containerd2_version_ok "$v" \
    && containerd2_prefix_ok "$p" 2>/dev/null; then
    log "containerd 2: $p/bin/containerd $v (runc $(runc_version "$p/bin/runc")) present"
    return
  fi
  [[ -n $v ]] && log "containerd 2: $p/bin/containerd reports '$v', rebuilding"
  command -v patchelf >/dev/null || die "patchelf is missing"

  local scratch new interp="" b src i d
  scratch=$(mktemp -d /var/tmp/cedana-containerd2.XXXXXX)
  CLEANUP+=("rm -rf '$scratch'")
  private_apt_fetch "containerd 2" "$scratch" "$CONTAINERD2_SUITE" containerd runc

  new=$p.new
  rm -rf "$new" "$p.old"
  mkdir -p "$new/lib" "$new/bin"
  CLEANUP+=("rm -rf '$new'")
  stage_libs "$scratch" "$new/lib"
  for b in "${CONTAINERD2_BINS[@]}"; do
    src=""
    for d in usr/bin usr/sbin bin sbin; do
      # -L: usr/bin/runc is a link to ../sbin/runc.
      if [[ -f $scratch/staging/$d/$b && ! -L $scratch/staging/$d/$b ]]; then
        src=$scratch/staging/$d/$b
        break
      fi
    done
    [[ -n $src ]] || die "$b not found in the unpacked packages"
    cp -p "$src" "$new/bin/$b"
    if is_dynamic "$src"; then
      i=$(basename "$(patchelf --print-interpreter "$src")")
      [[ -z $interp || $interp == "$i" ]] || die "$b wants loader $i, another binary $interp"
      interp=$i
    fi
  done
  if [[ -n $interp ]]; then
    [[ -f $new/lib/$interp ]] || die "dynamic loader $interp not found in the unpacked packages"
    echo "$interp" >"$new/.interp"
  fi
  # As for CRIU: patch for NEW and verify there, then patch for the final prefix and swap.
  for b in "${CONTAINERD2_BINS[@]}"; do
    if is_dynamic "$new/bin/$b"; then patch_binary "$new/bin/$b" "$new/lib" "$interp"; fi
  done
  containerd2_prefix_ok "$new" || die "the containerd 2 binaries in $new do not work (see above)"
  swap_prefix "containerd 2" "$new" "$p" "$interp" containerd2_prefix_ok "${CONTAINERD2_BINS[@]/#/bin/}"
  log "containerd 2: installed $p/bin/containerd $(containerd_version "$p/bin/containerd")," \
    "runc $(runc_version "$p/bin/runc") ($(du -sh "$p" | cut -f1))"
}

# ---------------------------------------------------------------------------------------------
# 4. moto, an S3-compatible server for the object-storage tests
# ---------------------------------------------------------------------------------------------

# A venv of Debian's python3 (not whatever python3 comes first on PATH) at VENV, holding REQUIREMENT,
# whose MODULE imports and whose program BIN (under VENV/bin) exists. A venv cannot be moved, so it is
# built in place; the marker file, written last, says it is complete and which requirement it holds.
install_python_tool() { # LABEL VENV REQUIREMENT MODULE BIN [HOW LONG]
  local label=$1 venv=$2 requirement=$3 module=$4 bin=$2/bin/$5 how_long=${6:-}
  local marker=$venv/.cedana-requirement
  if [[ -x $bin && $(cat "$marker" 2>/dev/null || true) == "$requirement" ]] \
    && "$venv/bin/python" -c "import $module" 2>/dev/null; then
    log "$label: $bin ($requirement) present"
    return
  fi
  log "$label: installing $requirement into $venv${how_long:+ ($how_long)}"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  CLEANUP+=("[[ -f '$marker' ]] || rm -rf '$venv'")
  /usr/bin/python3 -m venv "$venv" || die "python3 -m venv failed (package python3-venv)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$requirement" \
    || die "pip could not install $requirement"
  "$venv/bin/python" -c "import $module" || die "$label does not import after the install"
  [[ -x $bin ]] || die "$bin is missing after the install"
  echo "$requirement" >"$marker"
  log "$label: installed $bin"
}

install_moto() {
  install_python_tool moto "$MOTO_VENV" "$MOTO_REQUIREMENT" moto.server moto_server "about a minute"
}

# docker-registry, unpacked from Debian's package of the system's own apt sources (a static Go binary).
install_registry() {
  local bin=$REGISTRY_PREFIX/usr/bin/docker-registry
  if [[ -x $bin ]]; then
    log "registry: $bin present"
    return
  fi
  log "registry: unpacking docker-registry into $REGISTRY_PREFIX"
  local tmp
  tmp=$(mktemp -d)
  CLEANUP+=("rm -rf '$tmp'")
  (cd "$tmp" && apt-get download docker-registry >/dev/null) || die "apt-get download docker-registry failed"
  mkdir -p "$REGISTRY_PREFIX.new"
  dpkg -x "$tmp"/docker-registry_*.deb "$REGISTRY_PREFIX.new" || die "unpacking docker-registry failed"
  rm -rf "$REGISTRY_PREFIX"
  mv "$REGISTRY_PREFIX.new" "$REGISTRY_PREFIX"
  [[ -x $bin ]] || die "$bin is missing after unpacking"
  log "registry: $bin"
}

# ---------------------------------------------------------------------------------------------
# 6. gcp-storage-emulator, a GCS emulator for the object-storage tests
# ---------------------------------------------------------------------------------------------

# As moto: a venv of Debian's python3 built in place, its marker file written last.
install_gcs_emulator() {
  install_python_tool "gcs emulator" "$GCS_EMULATOR_VENV" "$GCS_EMULATOR_REQUIREMENT" gcp_storage_emulator.server \
    gcp-storage-emulator
}

# ---------------------------------------------------------------------------------------------
install_apt_packages
install_criu
link_criu
install_containerd2
install_moto
install_registry
install_gcs_emulator

# ---------------------------------------------------------------------------------------------
# 7. Summary
# ---------------------------------------------------------------------------------------------
CRIU_V=$("$PREFIX/criu" --version) || die "$PREFIX/criu --version failed"
first_line() { "$@" 2>&1 | head -n1 || true; }
echo "---- cedana-rs setup summary ----"
echo "criu:       $CRIU_LINK -> $PREFIX/criu, $(awk '/^Version:/ {print $2}' <<<"$CRIU_V")"
echo "runc:       $(first_line runc --version)"
echo "containerd: $(first_line containerd --version)"
echo "containerd 2: $CONTAINERD2_PREFIX/bin/containerd $(containerd_version "$CONTAINERD2_PREFIX/bin/containerd"), runc $(runc_version "$CONTAINERD2_PREFIX/bin/runc")"
echo "dockerd:    $(first_line dockerd --version)"
echo "moto:       $MOTO_VENV/bin/moto_server ($(cat "$MOTO_VENV/.cedana-requirement"))"
echo "registry:   $REGISTRY_PREFIX/usr/bin/docker-registry"
echo "gcs emulator: $GCS_EMULATOR_VENV/bin/gcp-storage-emulator ($(cat "$GCS_EMULATOR_VENV/.cedana-requirement"))"
echo "criu check:"
if CHECK_OUT=$("$PREFIX/criu" check 2>&1); then rc=0; else rc=$?; fi
printf '%s\n' "$CHECK_OUT" | sed 's/^/  /'
((rc == 0)) || echo "  (criu check exited with status $rc)"
END_NS=$(date +%s%N)
printf 'setup finished in %d.%03d s\n' $(((END_NS - START_NS) / 1000000000)) $((((END_NS - START_NS) / 1000000) % 1000))
