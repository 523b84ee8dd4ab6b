# The matches zsh's completion system offers for a command line, one a line:
# an interactive zsh on a pseudo-terminal (zpty), compinit with FPATH_DIR
# first in $fpath, the line typed and TAB pressed; compadd is wrapped to
# print what it is given.
#
#   zsh -f zsh-complete.zsh FPATH_DIR 'qusctl reg'
zmodload zsh/zpty
fpath_dir=$1 line=$2
zpty z zsh -f -i
zpty -w z "fpath=(${(q)fpath_dir} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z "zstyle ':completion:*' list-grouped false; zstyle ':completion:*' format ''"
zpty -w z 'compadd () { builtin compadd -O __hits "$@"; print -l -- "<m>"${^__hits}"</m>" }'
# the sentinel's echo (__be''gin__) is not the sentinel: what follows it is clean
zpty -w z "bindkey '^I' complete-word; PROMPT=''; print __be''gin__"
zpty -r z out '*__begin__*'
zpty -n -w z "$line"$'\t'
# read until matches came and the terminal has been quiet for half a
# second, or for at most 20 s
integer seen=0 idle=0 tries=0
while (( tries++ < 400 && !(seen && idle >= 10) )); do
  if zpty -r -t z chunk; then
    print -rn -- "$chunk"
    [[ $chunk == *'<m>'* ]] && seen=1
    idle=0
  else
    sleep 0.05
    (( idle++ ))
  fi
done | grep -o '<m>[^"$]*</m>' | sed 's/<m>\(.*\)<\/m>/\1/' | sort -u
zpty -d z
