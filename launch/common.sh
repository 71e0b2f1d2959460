# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run on its own).

# Print "<script>: error: MESSAGE" to stderr and exit 2 (bad usage) or the given status.
die() {
  local status=2
  if [[ $1 =~ ^[0-9]+$ && $# -gt 1 ]]; then
    status=$1
    shift
  fi
  echo "$(basename "$0"): error: $*" >&2
  exit "$status"
}

# Exit unless option $1 has a value: $2 is the number of words left, $3 the next word
# (an option such as --dry-run is taken for a forgotten value, except after --sbatch-option).
need_value() {
  if (($2 < 2)) || [[ $3 == --* && $1 != --sbatch-option ]]; then
    die "option $1 needs a value (see --help)"
  fi
}

# Exit unless $2 is an integer >= $3 (the minimum); $1 names the option.
require_int() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
    die "$1 must be an integer >= $3, got '$2'"
  fi
}

# One word quoted for a POSIX shell: bare when safe, single-quoted otherwise.
quote_word() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# An environment assignment NAME=VALUE quoted so that it stays an assignment.
quote_env() {
  printf '%s=%s' "${1%%=*}" "$(quote_word "${1#*=}")"
}

# A command line (all arguments) quoted so that a shell runs exactly these words.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s' "$out"
}

# The absolute path of the repository that holds the launch/ directory.
repo_root() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}
