#!/usr/bin/env bash
# Builds PgBouncer 1.24.1 (Debian trixie's source package) once and prints the binary's path.
#
# Why: Neon's -pooler hosts run a modern PgBouncer, which tracks protocol-level prepared
# statements (>= 1.21, max_prepared_statements); Debian bookworm ships 1.18, which does not. The
# tests run against both. The binary is cached outside the clone, so a second run prints the path
# at once. The source comes from the machine's own Debian mirror: a deb-src entry for trixie
# with the same URI(s) as its bookworm entries, in a private apt configuration (sources, lists
# and caches in a temporary folder), so the machine's apt setup is left as it was.
# Needs: dpkg-dev gcc make pkg-config libevent-dev libssl-dev libc-ares-dev (.ci/run installs them).
set -euo pipefail

version=1.24.1
suite=trixie
cache="${XDG_CACHE_HOME:-$HOME/.cache}/playing-with-neon/pgbouncer-$version"
binary="$cache/pgbouncer"

if [[ -x "$binary" ]] && "$binary" --version 2>/dev/null | grep -q "PgBouncer $version\$"; then
    echo "$binary"
    exit 0
fi

# The URIs of the machine's entries for its own release (not -updates or -security), from
# deb822 files (*.sources) and one-line lists alike.
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
mapfile -t uris < <(
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    } | awk -v codename="$codename" '
        function flush() { if (deb && mine) print uris; deb = mine = 0; uris = "" }
        /^[[:space:]]*$/ { flush(); next }
        /^Types:/ { deb = ($0 ~ /[[:space:]]deb([[:space:]]|$)/) }
        /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == codename) mine = 1 }
        END { flush() }
    ' | tr ' ' '\n'
    {
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true
    } | sed -E 's/\[[^]]*\]//' | awk -v codename="$codename" '$1 == "deb" && $3 == codename { print $2 }'
)
mapfile -t uris < <(printf '%s\n' "${uris[@]}" | grep . | sort -u)
if ((${#uris[@]} == 0)); then
    echo "build-pgbouncer: no apt entry for $codename found to take a URI from" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources.list.d" "$work/lists/partial" "$work/cache/archives/partial"
# As root, apt downloads as its user _apt, which must be able to write where it downloads to.
if ((EUID == 0)) && id _apt >/dev/null 2>&1; then
    chmod 0755 "$work"
    chown -R _apt "$work"
fi
{
    echo "Types: deb-src"
    echo "URIs: ${uris[*]}"
    echo "Suites: $suite"
    echo "Components: main"
    echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
} >"$work/sources.list.d/$suite-src.sources"
apt_options=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$work/sources.list.d"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
)

echo "build-pgbouncer: fetching $suite's pgbouncer source" >&2
apt-get "${apt_options[@]}" update -qq >&2
package_version=$(apt-cache "${apt_options[@]}" showsrc pgbouncer | awk '/^Version:/ && !v { v = $2 } END { print v }')
if [[ "$package_version" != "$version"-* ]]; then
    echo "build-pgbouncer: $suite has pgbouncer $package_version, not $version" >&2
    exit 1
fi
(cd "$work" && apt-get "${apt_options[@]}" source -qq "pgbouncer=$package_version" >&2)

echo "build-pgbouncer: building PgBouncer $version" >&2
cd "$work/pgbouncer-$version"
./configure --without-systemd >"$work/configure.log" 2>&1 || {
    tail -30 "$work/configure.log" >&2
    exit 1
}
make -j"$(nproc)" >"$work/make.log" 2>&1 || {
    tail -30 "$work/make.log" >&2
    exit 1
}
./pgbouncer --version >&2
mkdir -p "$cache"
# Into place with a rename, so a run beside this one never sees half a binary.
install -m 0755 pgbouncer "$cache/.pgbouncer.$$"
mv "$cache/.pgbouncer.$$" "$binary"
echo "$binary"
