"""The whole chain through the `deid` commands, as a user runs it: make-dataset -> train -> weights import
-> anonymize with the default model. Tiny generator file, random encoders, a few steps."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from deid import cli
from deid.media.video import probe
from deid.nets.model import read_checkpoint
from deid.runs import latest_checkpoint


def invoke(*args: str):
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert result.exit_code == 0, f"deid {' '.join(map(str, args))}: {result.output}\n{result.exception!r}"
    return result


@pytest.mark.slow
def test_make_dataset_train_import_then_anonymize_with_the_default_model(tmp_path, tiny_generator, tiny_generator_file,
                                                                        short_ntsc_clip):
    data, run, out = tmp_path / "generated", tmp_path / "run", tmp_path / "anonymized.mp4"
    invoke("make-dataset", "--n", 8, "--out", data, "--generator", tiny_generator_file, "--batch-size", 4, "--device", "cpu")
    invoke("make-dataset", "--verify", data)
    invoke("train", "--data", data, "--out", run, "--generator", tiny_generator_file, "--identity-encoder", "random",
           "--attribute-encoder", "random", "--landmark-encoder", "random", "--steps", 2, "--batch-size", 1,
           "--checkpoint-every", 3, "--sample-every", 0, "--validate-every", 0, "--log-every", 1, "--device", "cpu")
    # a cross step and a same-image step of one image each (the encoders are full-size: each step costs seconds);
    # the one checkpoint is the final one, off the --checkpoint-every schedule
    header, _ = read_checkpoint(latest_checkpoint(run))
    assert header["step"] == 2 and header["generator_fingerprint"] == tiny_generator.fingerprint
    losses = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in losses] == [0, 1]

    invoke("weights", "import", "deid-ffhq256", run)
    invoke("anonymize", short_ntsc_clip, "-o", out, "--device", "cpu")  # no --model: the imported one
    source, result = probe(short_ntsc_clip), probe(out)
    assert result.frame_count == source.frame_count and result.frame_rate == source.frame_rate
