"""The command line's reliability guarantees, driven through the real entry point in-process: every bad
input is one line naming the field or file (exit code 2, no traceback) and leaves every folder as it
was; a diverging run stops with exit code 1 naming the step or round, its last good checkpoint and the
knob to change; damaged run state is named (or recovered from without loss); one run per folder.

Placeholders in a case's arguments: {out} the runs folder, {file} a plain file, {cfg} a YAML file
(the case's `yaml`), {ucfg} a `samsuite unlearn run` config on the tiny saved benchmark, {bench} that
benchmark, {binmodel} a model folder holding pickled weights only, {badmodel} one whose
model.safetensors is truncated, {target} the benchmark's target model."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from suite_fixtures import unlearn_settings

from shared.runio import RunDir

TRAIN = ("train", "out_dir={out}")
FED = ("fed", "run", "out_dir={out}", "--no-progress")
FED_SMALL = (*FED, "num_nodes=4", "rounds=2", "local_steps=2")
UNLEARN = ("unlearn", "run", "{ucfg}")
BROKEN_YAML = "lr: [0.1, 0.2\nepochs: 3\n"
PYTHON_TAG = "lr: !!python/object/apply:os.system ['echo owned > {out}/owned']\n"
NOT_A_MAPPING = "- lr\n- 0.1\n"


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    message: str  # a regex the output must contain
    code: int = 2
    yaml: str | None = None  # written to {cfg}
    runs: tuple[str, ...] = ()  # finished runs copied into {out} first: "fed", "unlearn", "train"
    untouched: bool = True  # every file under the test's folder is byte-identical afterwards
    marks: tuple = field(default=())


def case(*args: str, message: str, **kw) -> Case:
    return Case(tuple(args), message, **kw)


NON_FINITE = "expected a finite number"
CASES: dict[str, Case] = {
    # ------------------------------------------------------------------------------------ samsuite train
    "train lr=inf": case(*TRAIN, "lr=inf", message=f"lr: {NON_FINITE}, got inf"),
    "train lr=-inf": case(*TRAIN, "lr=-inf", message=f"lr: {NON_FINITE}, got -inf"),
    "train lr=nan": case(*TRAIN, "lr=nan", message=f"lr: {NON_FINITE}, got nan"),
    "train lr=.inf": case(*TRAIN, "lr=.inf", message=f"lr: {NON_FINITE}"),
    "train lr=0": case(*TRAIN, "lr=0", message="lr: expected a value > 0"),
    "train lr=fast": case(*TRAIN, "lr=fast", message="lr: expected a number, got 'fast'"),
    "train momentum=-1": case(*TRAIN, "momentum=-1", message=r"momentum: expected a value in \[0.0, "),
    "train momentum=nan": case(*TRAIN, "momentum=nan", message=f"momentum: {NON_FINITE}"),
    "train weight_decay=-1": case(*TRAIN, "weight_decay=-1", message="weight_decay: expected a value >= 0"),
    "train max_loss=nan": case(*TRAIN, "max_loss=nan", message=f"max_loss: {NON_FINITE}"),
    "train sam rho=-1": case(*TRAIN, "options.sam.rho=-1", message="options.sam.rho: expected a value > 0"),
    "train sam rho=nan": case(*TRAIN, "options.sam.rho=nan", message=f"options.sam.rho: {NON_FINITE}"),
    "train sam rho=inf": case(*TRAIN, "options.sam.rho=inf", message=f"options.sam.rho: {NON_FINITE}"),
    "train sam bogus": case(*TRAIN, "options.sam.bogus=1",
                            message="options.sam.bogus: unknown option of SAM over SGD. Allowed: adaptive, "),
    "train gsam alpha<0": case(*TRAIN, "options.gsam.alpha=-1", message="options.gsam.alpha: expected a value >= 0"),
    "train unknown member options": case(*TRAIN, "options.samm.rho=0.1", message="options.samm: unknown optimizer"),
    "train unknown optimizer": case(*TRAIN, "optimizers=[sgd, samm]", message=r"optimizers\[1\]: unknown optimizer"),
    "train no optimizer": case(*TRAIN, "optimizers=[]", message="optimizers: expected at least one optimizer"),
    "train unknown base": case(*TRAIN, "base=adamx", message="base: unknown base optimizer 'adamx'"),
    "train epochs=0": case(*TRAIN, "epochs=0", message="epochs: expected an integer >= 1, got 0"),
    "train epochs=1.5": case(*TRAIN, "epochs=1.5", message="epochs: expected an integer, got 1.5"),
    "train batch_size=0": case(*TRAIN, "batch_size=0", message="batch_size: expected an integer >= 1"),
    "train m > batch": case(*TRAIN, "m=1000", message=r"m: expected 1 <= m <= batch_size \(64\), got 1000"),
    "train m and grad_accum": case(*TRAIN, "m=4", "grad_accum=2", message="m, grad_accum: set one of them"),
    "train val_fraction=0.9": case(*TRAIN, "val_fraction=0.9", message=r"val_fraction: expected a value in \["),
    "train label_noise=1": case(*TRAIN, "label_noise=1", message=r"label_noise: expected a value in \[0.0, "),
    "train label_noise=nan": case(*TRAIN, "label_noise=nan", message=f"label_noise: {NON_FINITE}"),
    "train label_noise_kind": case(*TRAIN, "label_noise_kind=pairwise", message="label_noise_kind: unknown value"),
    "train dataset": case(*TRAIN, "dataset=mnist", message="dataset: unknown data set 'mnist' for protocol=standard"),
    "train suite as dataset": case(*TRAIN, "dataset=rotated-digits",
                                   message="'rotated-digits' is a domain suite: set protocol=leave-one-domain-out"),
    "train protocol": case(*TRAIN, "protocol=lodo", message="protocol: unknown value 'lodo'"),
    "train domain": case(*TRAIN, "protocol=leave-one-domain-out", "dataset=rotated-digits", "domains=[90]",
                         message="domains: rotated-digits has no domain '90'"),
    "train domains standard": case(*TRAIN, "domains=[a]", message="domains: only used with protocol="),
    "train model": case(*TRAIN, "model=resnet", message="model: unknown model 'resnet'"),
    "train model option": case(*TRAIN, "model_options.depth=3", message="model_options.depth: unknown option of "
                                                                        "model 'digits-cnn'. Allowed: width"),
    "train model shape": case(*TRAIN, "model=cnn1d", message=r"input_shape: expected \(channels, length\) for "
                                                             r"model 'cnn1d'"),
    "train dataset option": case(*TRAIN, "dataset=mnist1d", "dataset_options.bogus=1", message="bogus"),
    "train seeds twice": case(*TRAIN, "seeds=[1, 1]", message="seeds: listed twice"),
    "train schedule": case(*TRAIN, "schedule=linear", message="schedule: unknown value 'linear'. Allowed: cosine"),
    "train threads=0": case(*TRAIN, "threads=0", message="threads: expected an integer >= 1"),
    "train unknown key": case(*TRAIN, "bogus=1", message="bogus: unknown key. Allowed: "),
    "train name=../../x": case(*TRAIN, "name=../../x", message="name: '../../x' is not a plain folder name"),
    "train name=/abs": case(*TRAIN, "name=/abs", message="name: '/abs' is not a plain folder name"),
    "train name=a/b": case(*TRAIN, "name=a/b", message="name: 'a/b' is not a plain folder name"),
    "train name=": case(*TRAIN, "name=", message="name: expected a folder name"),
    "train out_dir file": case("train", "out_dir={file}", message="out_dir: .*file is a file, not a folder"),
    "train out_dir under file": case("train", "out_dir={file}/runs", message="out_dir: .*cannot be created"),
    "train broken yaml": case("train", "{cfg}", yaml=BROKEN_YAML,
                              message=r"config file .*cfg.yaml: not valid YAML at line 2, column 7"),
    "train python tag": case("train", "{cfg}", yaml=PYTHON_TAG,
                             message=r"cfg.yaml: not valid YAML at line 1, column 5: the tag "
                                     r"!!python/object/apply:os.system is not allowed"),
    "train not a mapping": case("train", "{cfg}", yaml=NOT_A_MAPPING, message="expected a mapping .* got a list"),
    "train missing config": case("train", "nope.yaml", message="config file nope.yaml: not found"),
    "train config folder": case("train", "{out}", runs=("fed",), message="is a folder, not a YAML file"),
    "train two configs": case("train", "a.yaml", "b.yaml", message="expected at most one config file"),
    "train override yaml": case(*TRAIN, "lr=[1", message=r"lr: '\[1' is not a valid value"),
    "train override tag": case(*TRAIN, "lr=!!python/name:os.system", message="the tag !!python/name:os.system"),
    "train bare =": case(*TRAIN, "=3", message="expected key=value"),
    "train over fed run": case(*TRAIN, "name=fed-small", runs=("fed",),
                               message=r"holds a 'fed' run .*not a 'train' run"),
    "train usage": case("train", "--bogus", message="No such option '--bogus'"),
    # ------------------------------------------------------------------------------------ samsuite fed
    "fed lr=inf": case(*FED, "lr=inf", message=f"lr: {NON_FINITE}, got inf"),
    "fed lr=nan": case(*FED, "lr=nan", message=f"lr: {NON_FINITE}, got nan"),
    "fed rho=inf": case(*FED, "rho=inf", message=f"rho: {NON_FINITE}"),
    "fed rho=nan": case(*FED, "rho=nan", message=f"rho: {NON_FINITE}"),
    "fed rho=-inf": case(*FED, "rho=-inf", message=f"rho: {NON_FINITE}"),
    "fed lr_decay=inf": case(*FED, "lr_decay=inf", message=f"lr_decay: {NON_FINITE}"),
    "fed alpha=nan": case(*FED, "alpha=nan", message=f"alpha: {NON_FINITE}"),
    "fed weight_decay=-inf": case(*FED, "weight_decay=-inf", message=f"weight_decay: {NON_FINITE}"),
    "fed momentum=2": case(*FED, "momentum=2", message=r"momentum: expected a value in \[0.0"),
    "fed fail_prob=1": case(*FED, "fail_prob=1", message=r"fail_prob: expected a value in \[0.0"),
    "fed max_loss=inf": case(*FED, "max_loss=inf", message=f"max_loss: {NON_FINITE}"),
    "fed local_test_fraction=nan": case(*FED, "local_test_fraction=nan", message=f"local_test_fraction: {NON_FINITE}"),
    "fed option inf": case(*FED, "optimizer_options.alpha=inf", message=f"optimizer_options.alpha: {NON_FINITE}"),
    "fed option bogus": case(*FED, "optimizer_options.bogus=1", message="bogus: unknown option of SAM over SGD"),
    "fed num_nodes=100000": case(*FED, "num_nodes=100000", message="num_nodes: at most 10,000 .* got 100,000"),
    "fed num_nodes=1348": case(*FED, "num_nodes=1348", message="num_nodes: digits has 1347 training samples"),
    "fed num_nodes=1": case(*FED, "num_nodes=1", message="num_nodes: expected an integer >= 2"),
    "fed device=cuda:7": case(*FED, "device=cuda:7", message="device: 'cuda:7' is not on this machine. Allowed here: "
                                                             "auto, cpu"),
    "fed device=tpu": case(*FED, "device=tpu", message="device: unknown device 'tpu'. Allowed here: auto, cpu"),
    "fed name=../../x": case(*FED, "name=../../x", message="name: '../../x' is not a plain folder name"),
    "fed name=/abs": case(*FED, "name=/abs", message="name: '/abs' is not a plain folder name"),
    "fed name=": case(*FED, "name=", message="name: expected a folder name"),
    "fed name=..": case(*FED, "name=..", message="name: '..' is not a plain folder name"),
    "fed topology": case(*FED, "topology=rign", message="topology: unknown topology 'rign'; did you mean 'ring'"),
    "fed topology option": case(*FED, "topology=random-k", "topology_options.k=0", message="topology"),
    "fed algorithm": case(*FED, "algorithm=dfedsamm", message="algorithm: unknown algorithm 'dfedsamm'"),
    "fed dataset": case(*FED, "dataset=mnist", message="dataset: unknown dataset 'mnist'"),
    "fed partitioner": case(*FED, "partitioner=x", message="partitioner: unknown partitioner 'x'"),
    "fed rounds=0": case(*FED, "rounds=0", message="rounds: expected an integer >= 1"),
    "fed epochs and steps": case(*FED, "local_epochs=1", "local_steps=1", message="local_epochs, local_steps: set one"),
    "fed gossip_steps=0": case(*FED, "gossip_steps=0", message="gossip_steps: expected an integer >= 1"),
    "fed engine": case(*FED, "engine=ray", message="engine: unknown value 'ray'"),
    "fed out_dir file": case("fed", "run", "out_dir={file}", message="out_dir: .*file is a file, not a folder"),
    "fed broken yaml": case("fed", "run", "{cfg}", yaml=BROKEN_YAML, message="cfg.yaml: not valid YAML at line 2"),
    "fed python tag": case("fed", "run", "{cfg}", yaml=PYTHON_TAG, message="the tag !!python/object/apply:os.system"),
    "fed not a mapping": case("fed", "run", "{cfg}", yaml=NOT_A_MAPPING, message="expected a mapping"),
    "fed over unlearn run": case(*FED, "name=small", runs=("unlearn",),
                                 message=r"holds a 'unlearn' run .*not a 'fed' run"),
    "fed over train run": case(*FED, "name=train-small", runs=("train",), message=r"holds a 'train' run"),
    "fed resume other config": case(*FED_SMALL, "name=fed-small", "lr=0.2", runs=("fed",),
                                    message="fed-small: holds a run with a different config; choose another name= "
                                            "or set resume=false"),
    "fed resume fewer rounds": case(*FED_SMALL, "name=fed-small", "rounds=1", runs=("fed",),
                                    message="rounds: .*fed-small already ran 2 rounds"),
    "fed sweep broken yaml": case("fed", "sweep", "{cfg}", yaml=BROKEN_YAML, message="sweep file .*not valid YAML"),
    "fed sweep no grid": case("fed", "sweep", "{cfg}", yaml="rounds: 2\n", message="needs a 'sweep:' section"),
    "fed sweep name": case("fed", "sweep", "{cfg}", yaml="sweep: {name: ../x, grid: {algorithm: [dfedsam]}}\n",
                           message="sweep.name: '../x' is not a plain folder name"),
    "fed sweep missing": case("fed", "sweep", message="Missing argument 'ARGS...'"),
    "fed sweep overrides only": case("fed", "sweep", "rounds=2", message="expected a sweep file"),
    "fed compare missing": case("fed", "compare", "{out}/nope", message="nope: not a fedsam run folder"),
    # ------------------------------------------------------------------------------------ samsuite unlearn
    "unlearn lr=inf": case(*UNLEARN, "unlearn.lr=inf", message=f"unlearn.lr: {NON_FINITE}"),
    "unlearn lr=nan": case(*UNLEARN, "unlearn.lr=nan", message=f"unlearn.lr: {NON_FINITE}"),
    "unlearn rho=inf": case(*UNLEARN, "unlearn.rho=inf", message=f"unlearn.rho: {NON_FINITE}"),
    "unlearn beta=nan": case(*UNLEARN, "unlearn.beta=nan", message=f"unlearn.beta: {NON_FINITE}"),
    "unlearn max_loss=inf": case(*UNLEARN, "unlearn.max_loss=inf", message=f"unlearn.max_loss: {NON_FINITE}"),
    "unlearn relearn lr=inf": case(*UNLEARN, "relearn.lr=inf", message=f"relearn.lr: {NON_FINITE}"),
    "unlearn method lr=inf": case(*UNLEARN, "methods=[{objective: npo, lr: .inf}]",
                                  message=rf"methods\[0\].lr: {NON_FINITE}"),
    "unlearn sam option": case(*UNLEARN, "unlearn.smoother=sam", "unlearn.sam_options.bogus=1",
                               message="sam_options.bogus: unknown option of SAM over AdamW"),
    "unlearn objective": case(*UNLEARN, "unlearn.objective=nope", message="objective: unknown objective 'nope'"),
    "unlearn n_samples": case(*UNLEARN, "relearn.n_samples=1000",
                              message=r"relearn.n_samples: 1000 is more than the \d+ texts of the forget set"),
    "unlearn relearn metrics": case(*UNLEARN, "relearn.metrics=[nope]", message=r"relearn.metrics: .*cannot compute "
                                                                                  r"\['nope'\]"),
    "unlearn eval metrics": case(*UNLEARN, "eval.metrics=[nope]", message=r"eval.metrics: .*cannot compute \['nope'\]"),
    "unlearn privleak": case(*UNLEARN, "eval.metrics=[privleak]", "retrain=null",
                             message="privleak needs a retrained model"),
    "unlearn device=tpu": case(*UNLEARN, "device=tpu", message="device: unknown device 'tpu'"),
    "unlearn device=cuda:7": case(*UNLEARN, "device=cuda:7", message="device: 'cuda:7' is not on this machine"),
    "unlearn benchmark": case(*UNLEARN, "benchmark=nope", message="benchmark: unknown benchmark 'nope'"),
    "unlearn model path": case(*UNLEARN, "model=/nonexistent/model", message="model: .*/nonexistent/model"),
    "unlearn retrain path": case(*UNLEARN, "retrain=/nonexistent/retrain", message="retrain: .*/nonexistent/retrain"),
    "unlearn name=../x": case(*UNLEARN, "name=../x", message="name: '../x' is not a plain folder name"),
    "unlearn name=/abs": case(*UNLEARN, "name=/abs", message="name: '/abs' is not a plain folder name"),
    "unlearn name=": case(*UNLEARN, "name=", message="name: expected a folder name"),
    "unlearn dtype": case(*UNLEARN, "dtype=float8", message="dtype: unknown value 'float8'"),
    "unlearn toy prepare scale": case("unlearn", "run", "prepare.scale=huge", "out_dir={out}",
                                      message="prepare.scale: unknown value 'huge'"),
    "unlearn toy prepare override": case("unlearn", "run", "prepare.overrides=[epochs=inf]", "out_dir={out}",
                                         message=f"epochs: {NON_FINITE}"),
    "unlearn broken yaml": case("unlearn", "run", "{cfg}", yaml=BROKEN_YAML, message="not valid YAML at line 2"),
    "unlearn python tag": case("unlearn", "run", "{cfg}", yaml=PYTHON_TAG, message="the tag !!python/object/apply"),
    "unlearn not a mapping": case("unlearn", "run", "{cfg}", yaml=NOT_A_MAPPING, message="expected a mapping"),
    "unlearn over a finished run": case(*UNLEARN, "eval.metrics=[nope]", runs=("unlearn",),
                                        message=r"eval.metrics: .*\['nope'\]"),
    "unlearn over fed run": case(*UNLEARN, "name=fed-small", runs=("fed",), message=r"holds a 'fed' run"),
    "unlearn eval pickled": case("unlearn", "eval", "--model", "{binmodel}", "--benchmark", "{bench}",
                                 message=r"pytorch_model.bin: pickled .* refused"),
    "unlearn eval corrupt": case("unlearn", "eval", "--model", "{badmodel}", "--benchmark", "{bench}",
                                 message=r"model.safetensors"),
    "unlearn eval device": case("unlearn", "eval", "--model", "{target}", "--benchmark", "{bench}", "--device",
                                "cuda:7", message="device: 'cuda:7' is not on this machine"),
    "unlearn eval name": case("unlearn", "eval", "--model", "{target}", "--benchmark", "{bench}", "--name", "../x",
                              "--out-dir", "{out}", message="name: 'eval-../x' is not a plain folder name"),
    "unlearn relearn model": case("unlearn", "relearn", "--model", "/nonexistent/m", "--benchmark", "{bench}",
                                  message="model: .*/nonexistent/m"),
    "unlearn relearn n_samples": case("unlearn", "relearn", "n_samples=1000", "--model", "{target}", "--benchmark",
                                      "{bench}", "--out", "{out}/attack", message="n_samples: 1000 is more than"),
    "unlearn relearn lr": case("unlearn", "relearn", "lr=nan", "--model", "{target}", message=f"lr: {NON_FINITE}"),
    "unlearn prepare device": case("unlearn", "prepare", "--device", "tpu", "--out", "{out}/m",
                                   message="device: unknown device 'tpu'"),
    "unlearn prepare epochs": case("unlearn", "prepare", "epochs=inf", "--out", "{out}/m",
                                   message=f"epochs: {NON_FINITE}"),
    "unlearn compare missing": case("unlearn", "compare", "{out}/nope", message="nope: no summary.json"),
    "unlearn prepare threads": case("unlearn", "prepare", "--threads", "0", "--out", "{out}/m",
                                    message="Invalid value for '--threads': 0 is not in the range x>=1"),
    # ------------------------------------------------------------------------------------ samsuite bench
    "bench optim threads": case("bench", "optim", "--threads", "0", message="Invalid value for '--threads'"),
    "bench unlearn device": case("bench", "unlearn", "--device", "tpu", message="device: unknown device 'tpu'"),
    "bench eval device": case("bench", "eval", "--device", "cuda:3", message="device: 'cuda:3' is not on this machine"),
    # ------------------------------------------------------------------------------------ diverging runs
    "train diverges": case(*TRAIN, "lr=1e4", "epochs=2", "optimizers=[sgd]", code=1, untouched=False,
                           message=r"error: epoch 1, optimizer sgd: the loss diverged \(training loss nan, limit "
                                   r"max_loss=10000\); stopped before applying it; no checkpoint was saved. Lower lr"),
    "fed diverges": case(*FED, "lr=5", "rounds=8", code=1, untouched=False,
                         message=r"error: round 1: the loss diverged \(mean local training loss .*max_loss=10000\); "
                                 r"stopped .*; no checkpoint was saved. Lower lr \(or rho\), or raise max_loss"),
    "fed diverges after a checkpoint": case(*FED_SMALL, "rounds=4", "name=fed-small", "lr=5", "resume=false",
                                            "max_loss=3", code=1, untouched=False,
                                            message=r"round \d: the loss diverged"),
    "unlearn diverges": case(*UNLEARN, "unlearn.lr=3", "unlearn.steps=6", "unlearn.max_loss=100", code=1,
                             untouched=False,
                             message=r"error: step \d: the loss diverged .*; the last good checkpoint is .*"
                                     r"checkpoint.safetensors \(step \d\). Lower lr"),
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory, unlearn_bench: Path) -> Path:
    """One finished run of each kind, copied into a case's runs folder when it asks for them."""
    from experiments.cli import main

    out = tmp_path_factory.mktemp("finished")
    assert main(["fed", "run", f"out_dir={out}", "--no-progress", "num_nodes=4", "rounds=2", "local_steps=2",
                 "name=fed-small"]) == 0
    assert main(["train", f"out_dir={out}", "name=train-small", "epochs=1", "model_options.width=4",
                 "optimizers=[sgd]"]) == 0
    cfg = out / "small.yaml"
    cfg.write_text(yaml.safe_dump(unlearn_settings(unlearn_bench, out, methods=[{"objective": "npo"}])))
    assert main(["unlearn", "run", str(cfg)]) == 0
    cfg.unlink()
    return out


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory, unlearn_bench: Path) -> dict[str, Path]:
    """The benchmark's target model, a copy with pickled weights only, a copy with truncated safetensors."""
    target = Path(json.loads((unlearn_bench / "benchmark.json").read_text())["models"]["target"])
    root = tmp_path_factory.mktemp("models")
    pickled = Path(shutil.copytree(target, root / "pickled"))
    weights = pickled / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), pickled / "pytorch_model.bin")
    weights.unlink()
    corrupt = Path(shutil.copytree(target, root / "corrupt"))
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {"target": target, "binmodel": pickled, "badmodel": corrupt}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_case(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli, unlearn_bench: Path,
                  finished_runs: Path, model_folders: dict[str, Path]) -> None:
    c = CASES[name]
    monkeypatch.chdir(tmp_path)  # defaults (runs/, runs/toy-models) land here
    out = tmp_path / "runs"
    out.mkdir()
    for kind in c.runs:
        run = {"fed": "fed-small", "train": "train-small", "unlearn": "small"}[kind]
        shutil.copytree(finished_runs / run, out / run)
    (tmp_path / "file").write_text("not a folder")
    if c.yaml is not None:
        (tmp_path / "cfg.yaml").write_text(c.yaml.replace("{out}", str(out)))
    (tmp_path / "ucfg.yaml").write_text(yaml.safe_dump(unlearn_settings(unlearn_bench, out,
                                                                        methods=[{"objective": "npo"}])))
    values = {"out": out, "file": tmp_path / "file", "cfg": tmp_path / "cfg.yaml", "ucfg": tmp_path / "ucfg.yaml",
              "bench": unlearn_bench, **model_folders}
    before = snapshot(tmp_path)
    args = []
    for arg in c.args:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", str(value))
        args.append(arg)
    result = cli(*args)
    assert result.exit_code == c.code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.lower().startswith("error: ")]
    assert len(lines) == 1, result.output
    assert re.search(c.message, result.output), result.output
    assert not (out / "owned").exists()  # no YAML tag ever runs code
    if c.untouched:
        assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = cli("--debug", "fed", "run", f"out_dir={tmp_path}", "lr=inf")
    assert result.exit_code == 2 and "Traceback" in result.output and "lr: expected a finite number" in result.output
    monkeypatch.setenv("SAMSUITE_DEBUG", "1")
    assert "Traceback" in cli("train", "lr=nan").output


def test_a_folder_in_use_is_refused_and_left_alone(cli, tmp_path: Path, finished_runs: Path) -> None:
    shutil.copytree(finished_runs / "fed-small", tmp_path / "fed-small")
    before = snapshot(tmp_path)
    holder = RunDir.acquire(tmp_path, "fed-small", "fed")  # another process's lock (an fd of its own)
    try:
        result = cli(*FED_SMALL[:2], f"out_dir={tmp_path}", "--no-progress", "num_nodes=4", "rounds=3",
                     "local_steps=2", "name=fed-small")
    finally:
        holder.release()
    assert result.exit_code == 2, result.output
    assert "another samsuite process (pid " in result.output and "is running in this folder" in result.output
    assert snapshot(tmp_path) == before
