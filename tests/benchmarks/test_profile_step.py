"""benchmarks/profile_step.py: one kind of step failing does not stop the others."""

from benchmarks.profile_step import measured


def test_a_measurement_is_formatted_and_a_failure_named_in_its_place():
    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    assert measured(lambda call: call(), lambda: 1.23456, 2) == "1.23"
    assert measured(lambda call: call(), out_of_memory, 1) == (
        "failed (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB)")
