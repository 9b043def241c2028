#!/usr/bin/env bash
# Make the working tree that a device call sends smaller, then put it back (the call sends the tracked files, the
# untracked files git does not ignore and the carried paths: 64 MiB in all; the tracked tree alone is ~35 MB, the
# MiniLM pack ~34 MB).
#
#   bash bench/device/slim_tree.sh on [PATH ...]   # untrack PATHs (default: docs) in the index and ignore them:
#                                                  # the files stay on disk, the call does not send them
#   ... the device call ...
#   bash bench/device/slim_tree.sh off             # track them again (index as before, ignore lines removed)
#
# Never commit between `on` and `off`: the commit would delete those files. `on` refuses when the index has staged
# changes, `off` restores exactly the paths `on` recorded (.git/slim_tree).
set -eu
cd "$(git rev-parse --show-toplevel)"
state=.git/slim_tree
exclude=.git/info/exclude
case ${1:-} in
on)
    shift
    [ -e "$state" ] && { echo "slim_tree is already on ($(tr '\n' ' ' <"$state")); run off first" >&2; exit 1; }
    git diff --cached --quiet || { echo "the index has staged changes: commit or unstage them first" >&2; exit 1; }
    paths=("${@:-docs}")
    echo "# slim_tree begin" >>"$exclude"
    for p in "${paths[@]}"; do
        git rm -r -q --cached -- "$p"
        echo "/${p%/}" >>"$exclude"
        echo "$p" >>"$state"
    done
    echo "# slim_tree end" >>"$exclude"
    echo "slim_tree on: ${paths[*]} not sent ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) tracked bytes)"
    ;;
off)
    [ -e "$state" ] || { echo "slim_tree is not on" >&2; exit 1; }
    sed -i '/^# slim_tree begin$/,/^# slim_tree end$/d' "$exclude"
    while read -r p; do git reset -q -- "$p"; done <"$state"
    rm "$state"
    git diff --cached --quiet || { echo "slim_tree off, but the index still differs from HEAD: check it" >&2; exit 1; }
    echo "slim_tree off"
    ;;
*) echo "usage: slim_tree.sh on [PATH ...] | off" >&2; exit 2 ;;
esac
