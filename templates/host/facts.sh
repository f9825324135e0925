#!/bin/sh
# The facts of a host in one round trip (provision/facts.py parses what it prints).
# POSIX sh: runs on any target, never stops at a failing probe, prints every section.
# Its input is the environment facts_request() sets (PROVISION_*).
# shellcheck disable=SC2016 # single-quoted scripts here are run by another sh (as a member)
set +e
export LC_ALL=C PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
sec() { printf '\n@@@provision:%s\n' "$1"; }
passwd_db="
$(getent passwd)"
# Sets home and uid of account $1 (empty: none) from the passwd database read once, not a getent
# and a cut per call (a team's accounts ask often); looked up by name where enumeration leaves
# the account out (NSS).
home_of() {
  case $passwd_db in
    *"
$1:"*) _l=${passwd_db#*"
$1:"}; _l=${_l%%"
"*} ;;
    *) _l=$(getent passwd "$1" | cut -d: -f2-) ;;
  esac
  _ifs=$IFS; IFS=:; set -f
  # shellcheck disable=SC2086 # split on ":" on purpose: password, uid, gid, gecos, home, shell
  set -- $_l
  IFS=$_ifs; set +f
  uid=${2-} home=${5-}
}
# Root never looks through a member's link (to the admin's ~/.ssh, to /root) and never opens
# her FIFO or other special file (it would hold the read forever).
# True when no component of her path $2 below her home $1 is a symbolic link.
unlinked() { _p=$1 _r=$2
  while [ -n "$_r" ]; do
    _p="$_p/${_r%%/*}"; [ -L "$_p" ] && return 1
    case $_r in */*) _r=${_r#*/};; *) _r=;; esac
  done; }
# Her file $1, when it is a regular one and no link, on the stdin of "$@", read within 5 s (no
# command: only whether it is); dd never follows a link swapped in since, nor waits on a FIFO.
regular_in='f=$1; shift; [ -f "$f" ] && [ ! -L "$f" ] && { [ $# -eq 0 ] ||
  timeout 5 dd if="$f" iflag=nofollow,nonblock status=none 2>/dev/null | "$@"; }'
# regular_in for her file $3 below her home $2: in this shell where no link of hers is on the
# way (no process more than the read needs: a team has many members), else as her ($1).
member_file() { _u=$1 _f="$2/$3"
  if unlinked "$2" "$3"; then shift 3; set -- "$_f" "$@"; eval "$regular_in"
  else shift 3; (cd / && timeout 5 runuser -u "$_u" -- sh -c "$regular_in" sh "$_f" "$@"); fi; }
# True when path $1 is one of the asked paths (read in the paths section: parsed there, no
# process more here).
asked() { case "
$PROVISION_PATHS
" in *"
$1
"*) return 0;; esac; return 1; }
# Members a previous run managed stay of interest after they leave the inventory (offboarding).
# shellcheck disable=SC2046,SC2086 # both lists are names, split on purpose
PROVISION_ACCOUNTS=$(printf '%s\n' $PROVISION_ACCOUNTS $(sed -n 's/.*"members": *\[\([^]]*\)\].*/\1/p' /var/lib/provision/state.json 2>/dev/null | tr -d '",') | sort -u)
# The slow sections (the docker CLI, a team's homes, keys and paths, sshd's checks, the
# driver) are functions run side by side, each into a file of its own, while the quick ones print
# below: on a host's several cores the read takes about its slowest section, not their sum.
# Each prints its own section markers; the order of sections in the transcript is free.
facts_accounts() {
sec account-status
today=$(( $(date +%s) / 86400 ))
# Each account's key count ("NAME COUNT"; "-" where her authorized_keys is an asked path, read
# below: the parser counts it there), then one shadow lookup of them all (getent takes many
# names; none would list every account, which the join below leaves out anyway).
# shellcheck disable=SC2086 # names, split on purpose
{ for u in $PROVISION_ACCOUNTS; do
    if asked "~$u/.ssh/authorized_keys"; then echo "$u -"; else home_of "$u"
      echo "$u $(member_file "$u" "$home" .ssh/authorized_keys grep -cE '^[^#[:space:]]')"; fi
  done
  getent shadow $PROVISION_ACCOUNTS; } |
  awk -v t="$today" 'index($0, ":") == 0 { keys[$1] = $2 == "" ? 0 : $2; next }
    { split($0, f, ":"); if (f[1] in keys) print f[1], (f[8] != "" && f[8] <= t) ? "expired" : "active", keys[f[1]] }'
}
facts_sshd() {
sec sshd-test; sshd -t 2>&1; echo "exit=$?"
sec sshd-effective; sshd -T 2>/dev/null | grep -iE '^(clientalive|port |permitrootlogin|passwordauthentication|authorizedkeysfile)'
}
facts_listening() {
sec listening
# TCP listeners and who holds them (process names, uid): ss, else (no iproute2) the kernel's
# tables joined to each process's sockets, as "proc ADDRESS:PORT UID NAME,…" (kernel hex).
if command -v ss >/dev/null; then ss -ltnpe 2>/dev/null | grep '^LISTEN'; else
  { awk '$4 == "0A" { print "L", $10, $2, $8 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
    find /proc/[0-9]*/fd -lname 'socket:*' -printf 'S %l %h\n' 2>/dev/null; } | awk '
    $1 == "L" { addr[$2] = $3; uid[$2] = $4; next }
    { ino = $2; gsub(/[^0-9]/, "", ino); if (!(ino in addr)) next
      pid = $3; sub(/^\/proc\//, "", pid); sub(/\/fd$/, "", pid)
      f = "/proc/" pid "/comm"; name = ""; getline name < f; close(f)
      if (name != "" && index("," names[ino] ",", "," name ",") == 0)
        names[ino] = names[ino] (names[ino] == "" ? "" : ",") name }
    END { for (i in addr) print "proc", addr[i], uid[i], names[i] }'
fi
}
facts_member_caches() {
sec member-caches
for u in $PROVISION_ACCOUNTS; do
  home_of "$u"; h=$home; [ -n "$h" ] || continue; l="$h/.cache/huggingface"
  # Her ~/.cache a link: where it leads is said, never looked into.
  if ! unlinked "$h" .cache; then echo "$u|symlink|$(readlink "$h/.cache")/huggingface"
  elif [ -L "$l" ]; then echo "$u|symlink|$(readlink "$l")"
  elif [ -d "$l" ]; then echo "$u|dir|$(timeout 30 du -sb "$l" 2>/dev/null | cut -f1)"
  elif [ -e "$l" ]; then echo "$u|file|"
  else echo "$u|missing|"; fi
done
}
facts_paths() {
sec paths
# Every asked path in a handful of processes (a team asks for hundreds): awk expands "~name/…"
# through the passwd database; one stat, one sha256sum and one reader serve them all.
# "sha256:PATH" asks for a file's digest instead of its content. Only regular files are read,
# never through a last link nor waiting on a FIFO (dd). A path below a link in a member's home
# (or through "..") is looked at as her, with her rights: root never reads through her link.
# Each batch is bounded in time; one that ran out says so, and the read fails rather than take
# the files it did not see for missing.
# No temporary directory: this section ends unfinished (the whole read then fails, below).
t=$(mktemp -d) || exit 1
: > "$t/dirs"; : > "$t/her"; : > "$t/late"; limit=30
bounded() { _l=$1; shift; timeout $limit "$@"; [ $? -ne 124 ] || echo "timed-out|$_l|$limit" >> "$t/late"; }
printf '%s\n' "${passwd_db#?}" > "$t/passwd"
# asked: request, path (and for one in a home: its account, the home); dirs: every directory
# between a home and an asked path.
printf '%s\n' "$PROVISION_PATHS" | awk -F: -v OFS='\t' -v dirs="$t/dirs" '
  FILENAME == ARGV[1] { home[$1] = $6; next }
  $0 == "" { next }
  { p = $0; sub(/^sha256:/, "", p)
    if (p !~ /^~/) { print $0, p; next }
    u = substr(p, 2); sub(/\/.*/, "", u); rest = p; sub(/^~[^\/]*\//, "", rest)
    if (!(u in home)) { print $0, ""; next }
    d = home[u]; n = split(rest, c, "/")
    for (i = 1; i < n; i++) { d = d "/" c[i]; if (!(d in seen)) { seen[d]; print d > dirs } }
    print $0, home[u] "/" rest, u, home[u] }' "$t/passwd" - > "$t/asked"
bounded stat xargs -d '\n' -r stat -c '%n	%F' < "$t/dirs" > "$t/dirkinds" 2>/dev/null
# root: what root looks at itself; her: account, request, path of what is looked at as her.
awk -F'\t' -v OFS='\t' -v her="$t/her" '
  FILENAME == ARGV[1] { kind[$1] = $2; next }
  $3 != "" { d = $4; n = split(substr($2, length($4) + 2), c, "/"); behind = 0
    for (i = 1; i <= n; i++) {
      if (c[i] == "..") behind = 1
      if (i < n) { d = d "/" c[i]; if (kind[d] == "symbolic link") behind = 1 } }
    if (behind) { print $3, $1, $2 > her; next } }
  { print $1, $2 }' "$t/dirkinds" "$t/asked" > "$t/root"
cut -f2 "$t/root" | grep -v '^$' | bounded stat xargs -d '\n' -r stat -c '%n	%F|%U|%G|%a' > "$t/stat" 2>/dev/null
awk -F'\t' 'FILENAME == ARGV[1] { kind[$1] = $2; next }
  kind[$2] ~ /^regular/ { print ($1 ~ /^sha256:/ ? "sum" : "read") "\t" $2 }' "$t/stat" "$t/root" > "$t/regular"
sed -n 's/^sum\t//p' "$t/regular" | bounded sha256sum xargs -d '\n' -r sha256sum > "$t/sums" 2>/dev/null
sed -n 's/^read\t//p' "$t/regular" | bounded read xargs -d '\n' -r sh -c 'for f; do printf "%s\t" "$f"
  dd if="$f" bs=262144 count=1 iflag=nofollow,nonblock,fullblock status=none 2>/dev/null | base64 -w0; echo; done' sh > "$t/content"
awk -F'\t' '$2 ~ /^symbolic link/ { print $1 }' "$t/stat" | bounded readlink xargs -d '\n' -r sh -c 'for f; do
  printf "%s\t%s\n" "$f" "$(readlink -- "$f")"; done' sh > "$t/links"
awk -F'\t' '
  FILENAME ~ /stat$/ { stat[$1] = $2; next }
  FILENAME ~ /sums$/ { h = $0; sub(/ .*/, "", h); f = $0; sub(/^[^ ]*  /, "", f); sum[f] = h; next }
  FILENAME ~ /content$/ { content[$1] = $2; next }
  FILENAME ~ /links$/ { link[$1] = $2; next }
  { if ($2 == "" || !($2 in stat)) { print $1 "|missing"; next }
    split(stat[$2], s, "|"); kind = s[1]; extra = ""
    if (kind ~ /^regular/) { kind = "file"; extra = ($1 ~ /^sha256:/) ? "sha256:" sum[$2] : content[$2] }
    else if (kind == "directory") { kind = "directory" }
    else if (kind == "symbolic link") { kind = "link"; extra = link[$2] }
    else { kind = "other" }
    print $1 "|" kind "|" s[2] "|" s[3] "|" s[4] "|" extra }' \
  "$t/stat" "$t/sums" "$t/content" "$t/links" "$t/root"
# As her, one path at a time (a member's links are few), printed as above.
as_her='tab=$(printf "\t")
while IFS=$tab read -r q f; do
  s=$(stat -c "%F|%U|%G|%a" -- "$f" 2>/dev/null) || { echo "$q|missing"; continue; }
  k=other x=
  case $s in
    regular*) k=file
      case $q in
        sha256:*) x=sha256:$(dd if="$f" iflag=nofollow,nonblock status=none 2>/dev/null | sha256sum | cut -d" " -f1);;
        *) x=$(dd if="$f" bs=262144 count=1 iflag=nofollow,nonblock,fullblock status=none 2>/dev/null | base64 -w0);;
      esac;;
    "directory|"*) k=directory;;
    "symbolic link|"*) k=link x=$(readlink -- "$f");;
  esac
  echo "$q|$k|${s#*|}|$x"
done'
cut -f1 "$t/her" | sort -u | while IFS= read -r u; do
  awk -F'\t' -v u="$u" -v OFS='\t' '$1 == u { print $2, $3 }' "$t/her" |
    (cd / && bounded "as $u" runuser -u "$u" -- sh -c "$as_her")
done
cat "$t/late"
rm -rf "$t"
}
facts_docker() {
sec docker
command -v docker
# One `docker info` (a CLI start and an API call, ~25 ms): version|running|runtimes. A daemon
# that is down answers "|0|null"; no CLI, nothing.
info=$(docker info --format '{{.ServerVersion}}|{{.ContainersRunning}}|{{json .Runtimes}}' 2>/dev/null)
rest=${info#*|}
echo "${info%%|*}"
echo "active=$(systemctl is-active docker 2>/dev/null)"
echo "enabled=$(systemctl is-enabled docker 2>/dev/null)"
echo "running=${rest%%|*}"
# provision's images and units (lines a host recorded before they were asked for lacks: none).
docker image ls --format 'image={{.Repository}}:{{.Tag}}' 2>/dev/null | grep '^image=provision/'
for u in $PROVISION_UNITS; do echo "unit=$u $(systemctl is-active "$u" 2>/dev/null) $(systemctl is-enabled "$u" 2>/dev/null)"; done
sec docker-runtimes; case $rest in *"|{"*) echo "${rest#*|}";; esac
}
facts_rootless() {
sec rootless
# Per account of interest (the service account too): lingering, its daemon's unit and socket,
# its docker context ("-" where her config is an asked path: the parser reads it there); for
# the service account also provision's images in its own daemon, asked as that account (root
# never talks to a socket an account controls).
for u in $PROVISION_ACCOUNTS $PROVISION_SERVICE_ACCOUNT; do
  home_of "$u"; id=$uid h=$home; [ -n "$id" ] || continue
  linger=no; [ -e "/var/lib/systemd/linger/$u" ] && linger=yes
  unit=no; member_file "$u" "$h" .config/systemd/user/docker.service && unit=yes
  sock=no; [ -S "/run/user/$id/docker.sock" ] && sock=yes
  if asked "~$u/.docker/config.json"; then ctx=-; else
    ctx=$(member_file "$u" "$h" .docker/config.json sed -n 's/.*"currentContext": *"\([^"]*\)".*/\1/p' | head -n 1); fi
  images=
  if [ "$u" = "$PROVISION_SERVICE_ACCOUNT" ] && [ "$sock" = yes ]; then
    images=$(cd / && timeout 30 runuser -u "$u" -- env -i HOME="$h" PATH="$PATH" XDG_RUNTIME_DIR="/run/user/$id" docker -H "unix:///run/user/$id/docker.sock" image ls --format '{{.Repository}}:{{.Tag}}' 2>/dev/null | grep '^provision/' | paste -sd, -)
  fi
  echo "$u|$linger|$unit|$sock|$ctx|$images"
done
}
facts_nvidia() {
sec nvidia-smi
nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total,uuid --format=csv,noheader,nounits 2>&1
echo "exit=$?"
sec nvidia-ctk; nvidia-ctk --version 2>/dev/null | head -n 1
}
facts_apt_locks() {
sec apt-locks
inodes=
for f in /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock; do
  [ -e "$f" ] && inode=$(stat -c %i "$f") && echo "inode $f $inode" && inodes="$inodes $inode"
done
# Only the locks on those inodes: a host's daemons hold many others, each a read of its comm.
awk -v inodes="$inodes" 'BEGIN { n = split(inodes, list, " "); for (i = 1; i <= n; i++) want[list[i]] }
  { k = split($6, dev, ":"); if (dev[k] in want) print $5, dev[k] }' /proc/locks 2>/dev/null |
while read -r pid inode; do
  echo "lock $pid $inode $(cat "/proc/$pid/comm" 2>/dev/null)"
done
}
# Each slow section's file ends with a line of its own once the section is done: one cut short
# (a full disk, a section that ended early) fails the whole read rather than have its facts read
# as absent (no Docker, no accounts, files missing: a plan would "fix" them).
slow=$(mktemp -d) || { echo "facts: no temporary directory (mktemp -d failed: /tmp full or read-only?)" >&2; exit 1; }
sections="facts_accounts facts_sshd facts_listening facts_member_caches facts_paths facts_docker
  facts_rootless facts_nvidia facts_apt_locks"
done_line="@@@provision-section-done"
for section in $sections; do { "$section"; echo "$done_line"; } > "$slow/$section" & done
sec os-release; cat /etc/os-release 2>/dev/null
sec uname; uname -m; uname -r; hostname
sec init; cat /proc/1/comm 2>/dev/null; systemctl is-system-running 2>/dev/null
sec identity; echo "uid=$(id -u)"; echo "sudo_user=${SUDO_USER:-}"
sec passwd; printf '%s\n' "${passwd_db#?}"
sec group; getent group
sec sudoers-d; ls -1 /etc/sudoers.d 2>/dev/null
sec sshd-include; grep -iE '^[[:space:]]*Include' /etc/ssh/sshd_config 2>/dev/null
sec cache-dir; stat -c '%F|%U|%G|%a' "$PROVISION_CACHE_DIR" 2>/dev/null
sec cache-acl; getfacl -cp "$PROVISION_CACHE_DIR" 2>/dev/null
sec cache-tokens; find "$PROVISION_CACHE_DIR" -maxdepth 2 -name token -type f 2>/dev/null
sec cache-models
for d in "$PROVISION_CACHE_DIR"/hub/models--*; do [ -d "$d" ] && echo "${d##*/}"; done
sec disk
p="$PROVISION_CACHE_DIR"; while [ ! -e "$p" ]; do p=$(dirname "$p"); done
df -P -B1 "$p" 2>/dev/null | tail -n 1
sec tools; for c in setfacl visudo flock sshd systemctl apt-get; do command -v "$c" >/dev/null && echo "$c"; done
sec packages; dpkg-query -W -f '${Package} ${Version} ${db:Status-Status}\n' docker-ce docker.io containerd.io nvidia-container-toolkit docker-ce-rootless-extras rootlesskit uidmap slirp4netns dbus-user-session fuse-overlayfs 2>/dev/null | grep ' installed$'
sec docker-repo
# Only when Docker is missing and the inventory lets the tool choose its source (auto).
if [ -n "$PROVISION_PROBE_DOCKER_REPO" ] && ! command -v docker >/dev/null; then
  timeout 5 bash -c 'exec 3<>/dev/tcp/download.docker.com/443' 2>/dev/null && echo reachable || echo unreachable
fi
sec nvidia-pci
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue
  case "$(cat "$d/class" 2>/dev/null)" in 0x03*) echo "${d##*/}";; esac
done
wait
# shellcheck disable=SC2086 # the names, split on purpose
set -- $sections
awk -v done="$done_line" -v want=$# '
  FNR == 1 { files++; if (NR > 1 && last != done) cut = 1 }
  { last = $0 } $0 != done { print }
  END { exit (cut || last != done || files != want) }' "$slow"/facts_*
written=$?
rm -rf "$slow"
if [ $written -ne 0 ]; then
  echo "facts: a section was cut short writing to a temporary file (/tmp full?)" >&2; exit 1
fi
sec end
