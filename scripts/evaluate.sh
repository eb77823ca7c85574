#!/usr/bin/env bash
# Run the prequential evaluation on the public data sets and write the result
# tables and plots into docs/evaluation.md, between the markers
# <!-- results:taobao --> ... <!-- /results:taobao --> and the same for
# online-retail. The narrative around the markers is left as it is.
#
# Usage: scripts/evaluate.sh [DATA], where DATA holds
# taobao-userbehavior/ and online-retail/ (default ../shared/data).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

data="${1:-../shared/data}"
taobao="${data}/taobao-userbehavior/taobao_first_users.csv.gz"
retail="${data}/online-retail/online_retail.csv.gz"
for file in "${taobao}" "${retail}"; do
    if [[ ! -f "${file}" ]]; then
        echo "evaluate.sh: ${file} not found; pass the folder of the data sets" >&2
        exit 2
    fi
done

out="$(mktemp -d)"
trap 'rm -rf "${out}"' EXIT

.venv/bin/fusionrec evaluate "${taobao}" --format taobao --every 3 \
    --plot docs/evaluation-taobao.png --markdown "${out}/taobao.md" --json >"${out}/taobao.json"
.venv/bin/fusionrec evaluate "${retail}" --format online-retail --every 10 \
    --repeat-purchases allow \
    --plot docs/evaluation-online-retail.png --markdown "${out}/online-retail.md" \
    --json >"${out}/online-retail.json"

.venv/bin/python - "${out}" <<'PY'
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
page = Path("docs/evaluation.md")
text = page.read_text()
for name in ("taobao", "online-retail"):
    tables = (out / f"{name}.md").read_text().strip()
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"docs/evaluation.md has no <!-- results:{name} --> markers")
    text = pattern.sub(lambda m: m.group(1) + tables + m.group(2), text)
page.write_text(text)
print("docs/evaluation.md updated")
PY
