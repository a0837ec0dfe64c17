"""benchmarks/offload_check.py: each offload mode's generation, against the one in place."""

from benchmarks.offload_check import main


def test_each_offload_gives_the_images_made_in_place(capsys):
    main(["--model", "tiny-sd15", "--steps", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny-sd15 64², 3 steps, every option at its default, cpu, float32"
    rows = [line.strip("| ").split(" | ") for line in lines[3:]]
    assert [row[0] for row in rows] == ["in place", "model", "sequential"]
    assert [row[3] for row in rows] == ["—", "0.00e+00", "0.00e+00"]  # the same pixels
    assert all(row[4] == "none" for row in rows)  # no warning
