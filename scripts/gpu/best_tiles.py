"""The attention tile spec whose chunk cost (one HCA, one CSA and two sliding calls of `bench attention`'s
JSON) is at least 3% under the default's; prints nothing when none is."""
import collections
import json
import sys

rows = json.load(open(sys.argv[1]))["results"]
tot, n = collections.defaultdict(float), collections.Counter()
for r in rows:
    if "ms" in r:
        tot[r["tiles"]] += r["ms"] * (2 if r["mode"] == "none" else 1)
        n[r["tiles"]] += 1
ok = {t: v for t, v in tot.items() if n[t] == 3}
best = min(ok, key=ok.get)
print(best if best != "default" and ok[best] < 0.97 * ok["default"] else "")
