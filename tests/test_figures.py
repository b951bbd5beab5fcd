"""`deid mix` and `deid interpolate` on a tiny random-weight model and real faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch
from click.testing import CliRunner

from deid import cli
from deid.atomic import TEMPORARY_GLOB
from deid.errors import DeidError
from deid.grid import GRID_GAP
from deid.nets.model import mix_grid
from deid.pipelines.figures import (
    InterpolateJob,
    MixJob,
    aligned_heads,
    interpolation_codes,
    interpolation_weights,
    run_interpolate,
    run_mix,
)


@pytest.fixture(scope="session")
def face_photos(tmp_path_factory, astronaut_png, carphone) -> list[Path]:
    """Three photos with one face each: the astronaut, her mirror image, and a carphone frame."""
    import av

    folder = tmp_path_factory.mktemp("faces")
    mirrored = folder / "mirrored.png"
    cv2.imwrite(str(mirrored), cv2.flip(cv2.imread(str(astronaut_png)), 1))
    with av.open(str(carphone)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="bgr24")
    phone = folder / "phone.png"
    cv2.imwrite(str(phone), cv2.resize(frame, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC))
    return [astronaut_png, mirrored, phone]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-3) -> None:
    """Equal up to float rounding relative to the tensor's scale: random-weight encoders in eval mode give huge
    codes (BatchNorm with default statistics), which magnify batch-size-dependent rounding."""
    assert (actual - expected).abs().max() <= tol * expected.abs().max()


@pytest.fixture(scope="session")
def heads(face_photos, tiny_model) -> torch.Tensor:
    return aligned_heads(face_photos, tiny_model.resolution)


def test_grid_geometry(tmp_path, face_photos, tiny_model):
    out = tmp_path / "grid.png"
    run_mix(MixJob(identities=tuple(face_photos[:2]), attributes=tuple(face_photos), output=out, labels=False), tiny_model)
    grid = cv2.imread(str(out))
    size = tiny_model.resolution
    rows, cols = 3, 2
    assert grid.shape == ((rows + 1) * (size + GRID_GAP) - GRID_GAP, (cols + 1) * (size + GRID_GAP) - GRID_GAP, 3)
    assert (grid[:size, :size] == 255).all()  # the top-left corner is empty


def test_cell_size_and_labels_change_the_layout(tmp_path, face_photos, tiny_model):
    out = tmp_path / "grid.png"
    run_mix(MixJob(tuple(face_photos[:1]), tuple(face_photos[:1]), out, cell_size=48, labels=True), tiny_model)
    grid = cv2.imread(str(out))
    assert grid.shape[1] == 2 * 48 + GRID_GAP
    assert grid.shape[0] > 2 * 48 + GRID_GAP  # label strips under the inputs


def test_mix_diagonal_equals_plain_reconstruction(heads, tiny_model):
    with torch.no_grad():
        cells = mix_grid(tiny_model, heads, heads)
        for i in range(len(heads)):
            assert_close_relative(cells[i, i], tiny_model(heads[i : i + 1], heads[i : i + 1])[0])
        # and off the diagonal the cell is the column's identity with the row's attributes
        expected = tiny_model(heads[0:1], heads[2:3])[0]
    assert_close_relative(cells[2, 0], expected)
    assert not torch.allclose(cells[0, 1], cells[1, 1])


@pytest.mark.parametrize("vary", ["identity", "attributes"])
@pytest.mark.parametrize("space", ["w", "z"])
def test_interpolation_endpoints_equal_the_endpoint_generations(heads, tiny_model, vary, space):
    start, end, fixed = heads
    t = interpolation_weights(5)
    w = interpolation_codes(tiny_model, vary, space, start, end, fixed, t)
    pairs = [(start, fixed), (end, fixed)] if vary == "identity" else [(fixed, start), (fixed, end)]
    with torch.no_grad():
        for w_end, (i_id, i_attr) in zip((w[0], w[-1]), pairs):
            expected = tiny_model.map(tiny_model.encode_identity(i_id[None]), tiny_model.encode_attributes(i_attr[None]))[0]
            assert_close_relative(w_end, expected)


def test_z_and_w_paths_differ_in_the_middle(heads, tiny_model):
    start, end, fixed = heads
    t = interpolation_weights(5)
    # attributes: in the untrained tiny M, two identity codes move w by ~1e-4, too little to cross a LeakyReLU
    # kink; two attribute codes move it by ~4, so the Z path bends
    in_w = interpolation_codes(tiny_model, "attributes", "w", start, end, fixed, t)
    in_z = interpolation_codes(tiny_model, "attributes", "z", start, end, fixed, t)
    assert_close_relative(in_w[[0, -1]], in_z[[0, -1]])
    assert (in_w[2] - in_z[2]).abs().max() > 1e-3  # M is not linear
    # W interpolation is a straight line: the midpoint is the mean of the ends
    assert_close_relative(in_w[2], (in_w[0] + in_w[-1]) / 2)


def test_eased_weights_run_from_0_to_1_slowly_at_the_ends():
    t = interpolation_weights(11, ease=True)
    assert t[0] == 0 and abs(t[-1] - 1) < 1e-6
    assert (t[1] - t[0]) < (t[6] - t[5])
    with pytest.raises(DeidError, match="at least 2"):
        interpolation_weights(1)


def test_interpolate_strip_and_video(tmp_path, face_photos, tiny_model):
    import av

    strip = tmp_path / "strip.png"
    run_interpolate(InterpolateJob("identity", "z", *face_photos, steps=4, output=strip), tiny_model)
    size = tiny_model.resolution
    assert cv2.imread(str(strip)).shape == (size, 4 * size + 3 * GRID_GAP, 3)
    video = tmp_path / "morph.mp4"
    run_interpolate(InterpolateJob("attributes", "w", *face_photos, steps=4, output=video, fps=10, seconds=1.2, cell_size=64), tiny_model)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (stream.width, stream.height) == (64, 64)
        assert stream.average_rate == 10
    assert frames == 12
    assert not list(tmp_path.glob(TEMPORARY_GLOB))


def test_existing_output_is_kept_without_overwrite(tmp_path, face_photos, tiny_model):
    out = tmp_path / "grid.png"
    out.write_bytes(b"keep me")
    with pytest.raises(DeidError, match="--overwrite"):
        run_mix(MixJob(tuple(face_photos[:1]), tuple(face_photos[:1]), out), tiny_model)
    assert out.read_bytes() == b"keep me"


def test_cli_mix_takes_several_paths_after_one_flag(tmp_path, face_photos, tiny_model, tiny_model_path):
    out = tmp_path / "grid.png"
    a, b, c = (str(p) for p in face_photos)
    result = CliRunner().invoke(cli.cli, ["mix", "--identity", a, b, "--attributes", a, b, c, "-o", str(out),
                                          "--model", str(tiny_model_path), "--device", "cpu", "--no-labels"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    pitch = tiny_model.resolution + GRID_GAP
    assert cv2.imread(str(out)).shape == (4 * pitch - GRID_GAP, 3 * pitch - GRID_GAP, 3)


def test_cli_photo_without_a_face_is_a_one_line_error(tmp_path, no_face_png, face_photos, tiny_model_path):
    result = CliRunner().invoke(cli.cli, ["mix", "--identity", str(no_face_png), "--attributes", str(face_photos[0]),
                                          "-o", str(tmp_path / "g.png"), "--model", str(tiny_model_path), "--device", "cpu"])
    assert result.exit_code != 0
    assert isinstance(result.exception, DeidError) and "no face" in str(result.exception).lower()
    assert str(no_face_png) in str(result.exception)  # names which photo
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("case", ["missing folder", "existing output", "wrong suffix", "not an image"])
def test_cli_mix_and_interpolate_check_paths_before_loading_the_model(tmp_path, face_photos, not_a_photo, case):
    """The model named here does not exist: a path error that is reported first was found before loading it."""
    a, b = (str(p) for p in face_photos[:2])
    output = {"missing folder": tmp_path / "nowhere" / "out.png", "existing output": tmp_path / "taken.png",
              "wrong suffix": tmp_path / "out.txt", "not an image": tmp_path / "out.png"}[case]
    (tmp_path / "taken.png").write_bytes(b"mine")
    photo = str(not_a_photo) if case == "not an image" else b
    model = ["--model", str(tmp_path / "no-such-model.safetensors"), "--device", "cpu"]
    for args in (["mix", "--identity", a, "--attributes", photo, "-o", str(output)],
                 ["interpolate", "--vary", "identity", "--from", a, "--to", photo, "--fixed", a, "-o", str(output)]):
        result = CliRunner().invoke(cli.cli, args + model)
        assert result.exit_code != 0 and isinstance(result.exception, DeidError), result.output
        message = str(result.exception)
        assert "no-such-model" not in message
        assert {"missing folder": "does not exist", "existing output": "already exists", "wrong suffix": "out.txt",
                "not an image": "not a readable image"}[case] in message
    assert (tmp_path / "taken.png").read_bytes() == b"mine"


@pytest.fixture
def not_a_photo(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not pixels")
    return path
