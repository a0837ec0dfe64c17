"""``omniportrait control``: writes a control image alone; bad input is one line, exit 2, no file."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniportrait.cli import main

ASTRONAUT = str(Path(__file__).resolve().parents[2] / "examples" / "astronaut.jpg")


@pytest.mark.parametrize("kind", ["pose", "canny", "image"])
def test_writes_the_control_image_png(kind, tmp_path, capsys):
    out = tmp_path / "sub" / f"{kind}.png"

    assert main(["control", kind, ASTRONAUT, "--out", str(out), "--width", "384", "--height", "256"]) == 0

    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (384, 256)
    assert f"wrote {out} (384x256, {kind})" in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_canny_thresholds_reach_the_detector(tmp_path):
    low, high = tmp_path / "low.png", tmp_path / "high.png"

    for out, (low_value, high_value) in ((low, ("20", "60")), (high, ("300", "600"))):
        args = ["--out", str(out), "--low-threshold", low_value, "--high-threshold", high_value]
        assert main(["control", "canny", ASTRONAUT, *args]) == 0

    assert (np.asarray(Image.open(low)) > 0).sum() > 2 * (np.asarray(Image.open(high)) > 0).sum()


@pytest.fixture(scope="module")
def coffee(tmp_path_factory) -> str:
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "coffee.jpg"
    Image.fromarray(data.coffee()).save(path)
    return str(path)


@pytest.mark.parametrize(
    "args, out_name, named",
    [
        (["pose", "{coffee}"], "out.png", "no person found in '{coffee}'"),
        (["pose", "{missing}"], "out.png", "does not exist"),
        (["canny", ASTRONAUT, "--width", "512"], "out.png", "--width and --height go together"),
        (["canny", ASTRONAUT, "--width", "0", "--height", "512"], "out.png", "--width must be an integer in [8,"),
        (["canny", ASTRONAUT, "--low-threshold", "300"], "out.png", "0 <= low <= high"),
        (["pose", ASTRONAUT, "--low-threshold", "50"], "out.png", "apply to canny, not pose"),
        (["image", ASTRONAUT], "out.jpg", "must end in .png"),
    ],
)
def test_bad_input_one_line_exit_2_no_file(args, out_name, named, tmp_path, coffee, capsys):
    fill = {"coffee": coffee, "missing": str(tmp_path / "missing.jpg")}

    code = main(["control", *(arg.format(**fill) for arg in args), "--out", str(tmp_path / out_name)])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("omniportrait control: error: ") and "\n" not in err
    assert named.format(**fill) in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind_is_refused_by_the_parser(tmp_path, capsys):
    code = main(["control", "depth", ASTRONAUT, "--out", str(tmp_path / "d.png")])

    err = capsys.readouterr().err.strip()
    assert code == 2 and "invalid choice: 'depth'" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []
