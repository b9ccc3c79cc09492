"""Every option a doc table lists for a plug-in is accepted by that plug-in, so docs and signatures cannot drift
(docs/algorithms.md listed a CAPO option `temperature` that CapoMask never took)."""
import re
from pathlib import Path

from rlkit.algorithms import ADVANTAGES, ROLLOUT_CORRECTIONS, SHAPERS
from rlkit.algorithms.plugins import POLICY_LOSSES, TOKEN_MASKS
from rlkit.reward.verifiers import VERIFIERS
from rlkit.sampling import GROUP_FILTERS, SAMPLERS

DOCS = Path(__file__).parent.parent / "docs"
REGISTRIES = {"algorithm.advantage": ADVANTAGES, "algorithm.reward_shaper": SHAPERS, "algorithm.group_filter": GROUP_FILTERS,
              "algorithm.policy_loss": POLICY_LOSSES, "algorithm.token_mask": TOKEN_MASKS, "algorithm.sampler": SAMPLERS,
              "algorithm.rollout_correction": ROLLOUT_CORRECTIONS, "reward.verifier": VERIFIERS}
OPTION_TABLE = "| option | default | meaning |"


def _refused(key: str, name: str, options: list[str]) -> list[str]:
    accepted, _, takes_any = REGISTRIES[key].option_names(name)
    return [] if takes_any else [o for o in options if o not in accepted]


def _plug_point_rows(text: str):
    """(key, name, options) of the "Where each part plugs in" table: `| part | `key` | `name` `{a, b}`; ... |`."""
    for line in text.splitlines():
        row = re.match(r"\| [^|]+ \| `([a-z_.]+)`[^|]* \| (.+) \|$", line)
        if row and row.group(1) in REGISTRIES:
            for names, options in re.findall(r"((?:`\w+`(?:, )?)+) `\{([^}]*)\}`", row.group(2)):
                for name in re.findall(r"`(\w+)`", names):
                    yield row.group(1), name, [o.strip() for o in options.split(",")]


def _option_tables(doc: str):
    """(heading, [(key, name)] the heading names, options) of every `| option | default | meaning |` table."""
    heading, plugins, lines = "", [], (DOCS / doc).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line
            plugins = [(k, n) for k, n in re.findall(r"`([a-z_.]+)=(\w+)`", line) if k in REGISTRIES]
            if doc == "verifiers.md" and re.fullmatch(r"## `\w+`", line):
                plugins = [("reward.verifier", line[4:-1])]
        if line.strip() == OPTION_TABLE:
            rows = [r for r in lines[i + 2:] if r.startswith("|")]
            rows = rows[:next((j for j, r in enumerate(lines[i + 2:]) if not r.startswith("|")), len(rows))]
            yield heading, plugins, [re.match(r"\| `(\w+)", r).group(1) for r in rows]


def test_plug_point_table_lists_only_accepted_options():
    rows = list(_plug_point_rows((DOCS / "algorithms.md").read_text()))
    assert {("algorithm.token_mask", "capo"), ("algorithm.reward_shaper", "grpo_lambda"), ("algorithm.sampler", "fr3e")} \
        <= {(key, name) for key, name, _ in rows}
    for key, name, options in rows:
        assert not _refused(key, name, options), (key, name, _refused(key, name, options))


def test_option_tables_list_only_accepted_options():
    seen = set()
    for doc in ("algorithms.md", "verifiers.md"):
        for heading, plugins, options in _option_tables(doc):
            assert plugins, f"{doc}: {heading!r} has an option table but names no plug-in (`key=name`)"
            seen.update(plugins)
            refused = {o for o in options if all(o in _refused(k, n, [o]) for k, n in plugins)}
            assert not refused, (doc, heading, sorted(refused))
    assert {("algorithm.token_mask", "capo"), ("reward.verifier", "math"), ("algorithm.rollout_correction", "tis"),
            ("algorithm.rollout_correction", "seq_mask")} <= seen


def test_a_stale_option_is_caught():
    assert _refused("algorithm.token_mask", "capo", ["top_k", "temperature"]) == ["temperature"]
