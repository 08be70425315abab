"""The describe entry point: parameters, cache bytes and attention FLOPs against the transformer."""

import pathlib

from attamba_jax import describe
from attamba_jax.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def test_describe_paper_attamba(capsys):
    assert (
        describe.main(
            ["--config", str(CONFIGS / "paper/attamba_k8_w8.yaml"), "--context", "1024,32768", "model.dtype=float32"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "parameters: 62,751,488   (matching transformer: 60,039,680)" in out
    rows = {
        int(line.split("|")[0]): [float(x.replace(",", "")) for x in line.split("|")[1:]]
        for line in out.splitlines()
        if line.strip()[:1].isdigit()
    }
    # K=8: cache and attention cost about 1/8 of the transformer's at long context
    for t in (1024, 32768):
        kv, kv_t, kv_ratio, fl, fl_t, fl_ratio = rows[t]
        assert kv_t == 32768  # 8 layers x 2 x 512 values x 4 bytes per token
        assert abs(kv / kv_t - kv_ratio) < 1e-3 and abs(fl / fl_t - fl_ratio) < 1e-3
    assert 0.12 < rows[32768][2] < 0.13 and 0.12 < rows[32768][5] < 0.13


def test_matching_transformer_has_isoparam_count():
    cfg = load_config(CONFIGS / "paper/attamba_k4_w32.yaml").model
    assert describe.parameter_count(describe.matching_transformer(cfg)) == 60_039_680


def test_bad_context_is_an_error(capsys):
    assert describe.main(["--config", str(CONFIGS / "tiny.yaml"), "--context", "0"]) == 2
    assert "--context" in capsys.readouterr().err


def test_describe_reports_the_packing_and_its_padding(tmp_path, capsys):
    # Given three documents of 2 + 5, 2 + 9 and 2 + 4 byte tokens, aligned to K = 4
    for i, text in enumerate(["abcde", "abcdefghi", "abcd"]):
        (tmp_path / f"d{i}.txt").write_text(text)
    args = ["--config", str(CONFIGS / "tiny.yaml"), "--context", "256", f"data.train={tmp_path}/*.txt", "--corpus"]
    assert describe.main(args) == 0
    out = capsys.readouterr().out
    assert "packing: each document alone (data.document_masking); documents start at multiples of 4" in out
    # Then the first two documents are padded (7 -> 8, 11 -> 12), the last one is not
    assert "data.train: 3 documents, 24 tokens (mean 8); padding 2 tokens = 7.692% of the packed stream" in out
