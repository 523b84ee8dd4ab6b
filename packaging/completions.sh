#!/bin/sh
# Shell completion for qusd, qusctl and qusd-binfmt (bash, zsh and fish),
# generated from their argparse parsers by shtab (what each argument names
# comes from the parsers too: qusd.text.complete), into ROOT's
# usr/share, where each shell looks for a package's completions. Run by
# packaging/debian/rules with the package's own venv; the tests run it too.
#
#   sh packaging/completions.sh PYTHON ROOT    PYTHON can import qusd and shtab
set -eu
python=$1
root=$2
bash_dir=$root/usr/share/bash-completion/completions
zsh_dir=$root/usr/share/zsh/vendor-completions
fish_dir=$root/usr/share/fish/vendor_completions.d
mkdir -p "$bash_dir" "$zsh_dir" "$fish_dir"
for spec in qusd:qusd.daemon.parser qusctl:qusd.cli.parser qusd-binfmt:qusd.oneshot.parser; do
    prog=${spec%%:*}
    parser=${spec#*:}
    prefix=$(printf '%s' "$prog" | tr -c 'a-zA-Z0-9\n' _)
    shtab() {
        "$python" -m shtab --error-unimportable --prog "$prog" --prefix "$prefix" --shell "$@" "$parser"
    }
    shtab bash >"$bash_dir/$prog"
    shtab zsh >"$zsh_dir/_$prog"
    shtab fish >"$fish_dir/$prog.fish"
done
