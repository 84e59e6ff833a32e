"""The CLI is generated from the config dataclasses: flags, defaults and help come from their fields."""

from dataclasses import asdict, fields

import pytest

from layerviz import cli
from layerviz.compression.config import AdaptConfig, ImportanceConfig, SelectConfig
from layerviz.settings import SHARED, BenchConfig, EvalConfig, FinetuneConfig, Settings, field_docs
from layerviz.study.config import StudyConfig

COMMANDS = {"evaluate": EvalConfig, "importance": ImportanceConfig, "select": SelectConfig, "adapt": AdaptConfig,
            "bench": BenchConfig, "finetune": FinetuneConfig}
EXTRA = {"finetune": ["--out", "x"]}


def _parse(argv):
    args = cli.build_parser().parse_args(argv)
    return cli._config(args)


@pytest.mark.parametrize("cls", [*COMMANDS.values(), StudyConfig])
def test_every_field_is_documented(cls):
    docs = field_docs(cls)
    assert [f.name for f in fields(cls) if not docs.get(f.name)] == []


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_the_dataclass_defaults(command):
    cls = COMMANDS[command]
    assert asdict(_parse([command, *EXTRA.get(command, [])])) == asdict(cls())
    assert issubclass(cls, Settings) and {f.name for f in fields(cls)} >= set(SHARED)


def test_shared_settings_have_one_set_of_defaults():
    shared = {k: getattr(Settings(), k) for k in SHARED}
    for cls in COMMANDS.values():
        assert {k: getattr(cls(), k) for k in SHARED} == shared
    assert all(getattr(StudyConfig(), k) == v for k, v in shared.items() if hasattr(StudyConfig, k))


def test_flags_parse_into_the_config():
    cfg = _parse(["adapt", "--layers", "0,3", "7", "--policy", "{rank: 8, force: linear}", "--history-len", "5",
                  "--train", "{stage1_epochs: 2}"])
    assert cfg.layers == [0, 3, 7] and cfg.policy == {"rank": 8, "force": "linear"} and cfg.history_len == 5
    assert cfg.train == {"stage1_epochs": 2}
    assert _parse(["importance", "--no-ablation", "--fusion-weights", "fisher_sum=1,block_influence=2"]) == \
        ImportanceConfig(ablation=False, fusion_weights={"fisher_sum": 1.0, "block_influence": 2.0})
    assert _parse(["bench", "--ks", "4", "8", "--no-adapters"]).ks == [4, 8]
    assert _parse(["finetune", "--target-modules", "q_proj,v_proj", "--full", "--out", "x"]).target_modules == [
        "q_proj", "v_proj"]


def test_bad_flags_are_refused_naming_them(capsys):
    with pytest.raises(ValueError, match="--ks: '4,x' must be ints"):
        _parse(["bench", "--ks", "4,x"])
    with pytest.raises(SystemExit):
        _parse(["adapt", "--policy", "[1, 2]"])
    assert "give a mapping" in capsys.readouterr().err
    assert cli.main(["bench", "--ks", "4,x"]) == 2


def test_help_loads_no_heavy_module():
    """`layerviz --help` and every command's --help answer without torch, transformers or pandas (a config
    command loads only its config's torch-free module): the time of each is in docs/benchmarks.md."""
    import subprocess
    import sys

    probe = ("import sys; from layerviz import cli\n"
             "try:\n    cli.main({argv})\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'layerviz.evaluate', 'layerviz.study') "
             "if m in sys.modules))")
    commands = [[], *([c] for c in [*cli.CONFIG_COMMANDS, *cli.OTHER_COMMANDS])]
    for argv in commands:
        out = subprocess.run([sys.executable, "-c", probe.format(argv=[*argv, "--help"])], capture_output=True,
                             text=True)
        assert out.stdout.strip().splitlines()[-1] == "[]", (argv, out.stdout[-500:], out.stderr[-2000:])
