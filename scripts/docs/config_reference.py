"""Writes the config reference of docs/configuration.md from `launcher.config.KEYS`, the one table
that is the launcher's defaults, their meaning and what `--show_config` prints.

    python scripts/docs/config_reference.py           # rewrites the table in the page
    python scripts/docs/config_reference.py --check   # exit 1 when the page differs (the tests)
"""

import os
import sys

from launcher import config as config_lib

PAGE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "configuration.md")
START, END = (
  "<!-- config-reference: made by scripts/docs/config_reference.py -->",
  "<!-- /config-reference -->",
)


def table() -> str:
  rows = ["| key | default | meaning |", "| --- | --- | --- |"]
  for key, (default, meaning) in config_lib.KEYS.items():
    shown = (
      '""' if default == "" else f"`{default!r}`" if isinstance(default, str) else f"`{default}`"
    )
    rows.append(f"| `{key}` | {shown} | {meaning} |")
  return "\n".join(rows)


def main(check: bool) -> int:
  with open(PAGE) as f:
    page = f.read()
  head, rest = page.split(START)
  tail = rest.split(END)[1]
  wanted = f"{head}{START}\n{table()}\n\n{END}{tail}"
  if check:
    if wanted != page:
      print(f"{PAGE} is stale: run python scripts/docs/config_reference.py", file=sys.stderr)
      return 1
    return 0
  with open(PAGE, "w") as f:
    f.write(wanted)
  return 0


if __name__ == "__main__":
  sys.exit(main("--check" in sys.argv[1:]))
