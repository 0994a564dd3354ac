# Shared by launch/*.sh: one-line errors (exit 2) and printing every command before running it.

die() {
  echo "error: $*" >&2
  exit 2
}

_NEEDS_QUOTES="[][[:space:]'\"\$&;|<>()*?\`\\~{}]"

# Prints a command the way a shell would read it back, quoting only the words that need it.
show() {
  local out="+" word
  for word in "$@"; do
    if [[ -z "$word" || "$word" =~ $_NEEDS_QUOTES ]]; then
      out+=" '${word//\'/\'\\\'\'}'"
    else
      out+=" $word"
    fi
  done
  echo "$out"
}

# Prints, then runs unless --dry-run.
run() {
  show "$@"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

# `need_value OPTION "$#"`: an option that takes a value must be followed by one.
need_value() {
  [[ "$2" -ge 2 ]] || die "$1 needs a value"
}
