"""The ``hf-normsoftmax`` command line: a light start, and every subcommand and option run once.

* The console script declared in pyproject.toml answers ``--help`` (top level and per subcommand) and usage errors
  without importing torch, transformers or the ``hf_normsoftmax`` package (whose import registers the Auto classes
  and so imports both): checked on ``sys.modules`` in a fresh process, and on ``-X importtime`` for the installed
  script.
* ``card``, ``plot``, ``export`` and ``push`` on a small run dir (a saved tiny BERT variant with two real stability
  measurements); ``push`` goes over HTTP to the Hub test double (tests/hub_double.py), from a fresh process started
  through the console-script entry point, so the handlers' on-demand imports (and the Auto registration they bring)
  run there.
* test_every_option_is_exercised: the argv lists of this file use every option of every subcommand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import secrets
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_double import HubTestDouble  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALICE_TOKEN = "hf_alice_" + secrets.token_hex(16)
BOB_TOKEN = "hf_bob_" + secrets.token_hex(16)
HEAVY_MODULES = ("torch", "transformers", "hf_normsoftmax")

HELP_ARGVS = [["--help"], ["card", "--help"], ["push", "-h"], ["plot", "--help"], ["export", "--help"]]
USAGE_ERROR_ARGVS = [[], ["card"], ["push", "RUN_DIR"], ["no-such-command"]]
CARD_ARGVS = [
    ["card", "{run}", "--output", "{out}/card.md", "--repo-id", "alice/tiny-bert", "--model-name", "tiny-card-name"],
    ["card", "{run}", "-o", "{out}/short.md"],
]
PLOT_ARGVS = [["plot", "{run}"]]
PUSH_ARGVS = [["push", "{run}", "alice/cli-smoke", "--private", "--token-env", "HF_NS_CLI_TOKEN", "--message",
               "smoke push", "--model-name", "cli-smoke-model", "--no-processor"]]
EXPORT_ARGVS = [["export", "{run}", "{out}", "--overwrite"]]
PUSH_SHORT_ARGVS = [["push", "{run}", "bob/cli-smoke-2", "-m", "second", "--no-processor"]]


def console_script_target() -> tuple[str, str]:
    """(module, function) of the ``hf-normsoftmax`` console script in pyproject.toml."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, function = scripts["hf-normsoftmax"].split(":")
    return module, function


def fill(argv: list[str], **paths) -> list[str]:
    return [token.format(**{k: str(v) for k, v in paths.items()}) for token in argv]


def fresh_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_entry_point(argvs: list[list[str]], env: dict[str, str], cwd: Path) -> list[dict]:
    """Call the console script's function once per argv in ONE fresh process; per call: exit code, output, and
    which of HEAVY_MODULES were imported by then."""
    module, function = console_script_target()
    code = f"""
import contextlib, io, json, sys
from {module} import {function} as main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    results.append({{"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "imported": [m for m in {HEAVY_MODULES!r} if m in sys.modules]}})
print("RESULTS " + json.dumps(results))
"""
    completed = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True,
                               env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


# --------------------------------------------------------------------------------------------------------------------
# a light start
# --------------------------------------------------------------------------------------------------------------------


def test_help_and_usage_errors_import_neither_torch_nor_transformers(tmp_path):
    results = run_entry_point([*HELP_ARGVS, *USAGE_ERROR_ARGVS], fresh_env(), tmp_path)
    for argv, result in zip([*HELP_ARGVS, *USAGE_ERROR_ARGVS], results, strict=True):
        assert result["imported"] == [], (argv, result["imported"])
        if argv in HELP_ARGVS:
            assert result["code"] == 0 and "usage: hf-normsoftmax" in result["stdout"], (argv, result)
        else:
            assert result["code"] == 2 and "usage: hf-normsoftmax" in result["stderr"], (argv, result)
    assert "card" in results[0]["stdout"] and "push" in results[0]["stdout"] and "plot" in results[0]["stdout"]


def test_installed_console_script_is_this_one_and_starts_light(tmp_path):
    # the installed distribution's metadata (not a build's *.egg-info lying in the checkout, which is on sys.path)
    installed = [dist for dist in importlib.metadata.distributions(path=[sysconfig.get_path("purelib")])
                 if dist.metadata["Name"] == "hf_normsoftmax"]
    if not installed:
        pytest.skip("hf_normsoftmax is not installed in this environment")
    targets = [ep.value for ep in installed[0].entry_points if ep.group == "console_scripts"]
    module, function = console_script_target()
    assert targets == [f"{module}:{function}"], (
        "the installed hf-normsoftmax script is not the one pyproject.toml declares: reinstall (pip install -e .)")
    script = Path(sysconfig.get_path("scripts")) / "hf-normsoftmax"
    if not script.is_file():
        pytest.skip(f"no console script file at {script} (another install scheme)")
    completed = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], capture_output=True,
                               text=True, env=fresh_env(), cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=300)
    assert completed.returncode == 0 and "usage: hf-normsoftmax" in completed.stdout, completed.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines()
                if line.startswith("import time:")}
    assert imported and not imported & set(HEAVY_MODULES), sorted(imported & set(HEAVY_MODULES))


# --------------------------------------------------------------------------------------------------------------------
# the subcommands on a small run dir
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT variant with two stability measurements (as StabilityCallback writes them) and losses."""
    import torch

    import hf_normsoftmax as H
    from hf_normsoftmax.training.diagnostics import collect_stability_stats

    root = tmp_path_factory.mktemp("cli") / "run"
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=32, num_labels=2,
                                     sigma_reparam=True, logit_inverse_temperature=2.0)  # foldable by export
    model = H.NormSoftmaxBertForSequenceClassification(config).eval()
    model.save_pretrained(root)
    batch = {"input_ids": torch.randint(3, 97, (2, 8)), "labels": torch.tensor([0, 1])}
    records = []
    for step in (0, 4):
        records.append({"step": step, "epoch": step / 4, **collect_stability_stats(model, batch)})
        records.append({"step": step + 1, "loss": 0.7 - 0.1 * step})
        with torch.no_grad():  # something changes between the two measurements
            model.classifier.weight.mul_(1.5)
    (root / "stability_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (root / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": records}),
                                             encoding="utf-8")
    return root


def test_card_plot_and_export_with_every_option(run_dir, tmp_path):
    """In one process (one import of the libraries): card with and without options, plot, export."""
    import shutil

    run, stock = tmp_path / "run", tmp_path / "stock"
    shutil.copytree(run_dir, run)
    stock.mkdir()
    (stock / "old.txt").write_text("in the way", encoding="utf-8")  # --overwrite: written into a non-empty dir
    argvs = [*(fill(argv, run=run, out=tmp_path / "cards") for argv in CARD_ARGVS),
             *(fill(argv, run=run) for argv in PLOT_ARGVS), *(fill(argv, run=run, out=stock) for argv in EXPORT_ARGVS)]
    card, short_card, plot, export = run_entry_point(argvs, fresh_env(), tmp_path)

    assert card["code"] == 0 and short_card["code"] == 0, (card, short_card)
    text = (tmp_path / "cards" / "card.md").read_text(encoding="utf-8")
    assert text.startswith("---\n") and "tiny-card-name" in text and 'from_pretrained("alice/tiny-bert")' in text
    assert (tmp_path / "cards" / "short.md").read_text(encoding="utf-8").startswith("---\n")
    assert not (run / "README.md").exists()  # --output / -o: nothing written into the run dir

    assert plot["code"] == 0 and "stability_entropy.png" in plot["stdout"], plot
    data = (run / "stability_entropy.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000

    assert export["code"] == 0, export
    config = json.loads((stock / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "bert" and (stock / "model.safetensors").is_file()


@pytest.mark.xdist_group("hub")
def test_push_with_every_option_to_the_hub_double(run_dir, tmp_path):
    """Two pushes in one fresh process: alice's token from --token-env (HF_TOKEN holds bob's), then bob's from
    HF_TOKEN."""
    with HubTestDouble(tokens={ALICE_TOKEN: "alice", BOB_TOKEN: "bob"}) as hub:
        home = tmp_path / "hf_home"
        home.mkdir()
        env = fresh_env(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_TOKEN=BOB_TOKEN,
                        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_NS_CLI_TOKEN=ALICE_TOKEN, TRANSFORMERS_VERBOSITY="error")
        pushed, second = run_entry_point([fill(argv, run=run_dir) for argv in (*PUSH_ARGVS, *PUSH_SHORT_ARGVS)], env,
                                         tmp_path)
        for result in (pushed, second):
            assert result["code"] == 0, result
            assert "pushed" in result["stdout"]
            assert ALICE_TOKEN not in result["stdout"] + result["stderr"]
            assert BOB_TOKEN not in result["stdout"] + result["stderr"]
        assert hub.is_private("alice/cli-smoke")
        assert hub.commit_messages("alice/cli-smoke")[-1] == "smoke push"
        files = set(hub.list_files("alice/cli-smoke"))
        assert {"README.md", "config.json", "model.safetensors"} <= files
        assert not any(name.startswith(("tokenizer", "vocab")) for name in files)  # --no-processor: none needed
        assert "cli-smoke-model" in hub.file_bytes("alice/cli-smoke", "README.md").decode()
        assert hub.commit_messages("bob/cli-smoke-2")[-1] == "second"
        assert not hub.is_private("bob/cli-smoke-2")


# --------------------------------------------------------------------------------------------------------------------
# every option is used above
# --------------------------------------------------------------------------------------------------------------------

EXERCISED_ARGVS = [*HELP_ARGVS, *USAGE_ERROR_ARGVS, *CARD_ARGVS, *PLOT_ARGVS, *EXPORT_ARGVS, *PUSH_ARGVS,
                   *PUSH_SHORT_ARGVS]


def test_every_option_is_exercised():
    sys.path.insert(0, str(REPO))
    from hf_normsoftmax_cli import _load_cli

    parser = _load_cli().build_parser()
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    missing = []
    for name, subparser in subparsers.choices.items():
        argvs = [argv[1:] for argv in EXERCISED_ARGVS if argv[:1] == [name]]
        if not argvs:
            missing.append(name)
        used = {token.split("=", 1)[0] for argv in argvs for token in argv if token.startswith("-")}
        missing += [f"{name} {'/'.join(action.option_strings)}" for action in subparser._actions
                    if action.option_strings and not used & set(action.option_strings)]
    top_used = {argv[0] for argv in EXERCISED_ARGVS if argv}
    missing += ["/".join(action.option_strings) for action in parser._actions
                if action.option_strings and not top_used & set(action.option_strings)]
    assert not missing, f"subcommands / options no test of this file uses: {missing}"
