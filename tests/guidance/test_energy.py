import torch

from omniportrait.guidance.energy import energy, match_features


def features(seed=0, size=(8, 8)):
    torch.manual_seed(seed)
    return torch.randn(16, *size)


def test_identical_maps_match_themselves_and_score_the_mask_size():
    d = features()
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 1:5] = True
    result = match_features(d, mask, d, mask, "sum")
    assert torch.equal(result.matches, result.reference_points)
    assert torch.isclose(result.similarity, torch.tensor(float(mask.sum())))
    assert torch.isclose(match_features(d, mask, d, mask, "mean").similarity, torch.tensor(1.0))


def test_shifted_map_moves_matches_by_the_shift():
    reference = features(size=(10, 10))
    shift = 3
    generated = torch.roll(reference, shifts=shift, dims=-1)
    ref_mask = torch.zeros(10, 10, dtype=torch.bool)
    ref_mask[3:7, 2:6] = True
    gen_mask = torch.ones(10, 10, dtype=torch.bool)
    result = match_features(generated, gen_mask, reference, ref_mask)
    assert torch.equal(result.matches, result.reference_points + shift)


def test_energy_falls_as_similarity_rises_and_gradient_flows_to_generated_features():
    d_ref = features(1)
    d_gen = features(2).requires_grad_(True)
    mask = torch.ones(8, 8, dtype=torch.bool)
    result = match_features(d_gen, mask, d_ref, mask)
    e = energy(result.similarity, 8.5)
    e.backward()
    assert d_gen.grad.abs().sum() > 0
    assert energy(torch.tensor(10.0), 8.5) < energy(torch.tensor(1.0), 8.5)


def test_matches_stay_inside_the_generated_mask_and_an_empty_mask_scores_zero():
    d_ref, d_gen = features(1), features(2).requires_grad_(True)
    ref_mask = torch.ones(8, 8, dtype=torch.bool)
    gen_mask = torch.zeros(8, 8, dtype=torch.bool)
    gen_mask[4:, 4:] = True
    result = match_features(d_gen, gen_mask, d_ref, ref_mask)
    assert gen_mask.flatten()[result.matches].all() and len(result.matches) == 64
    empty = match_features(d_gen, torch.zeros_like(gen_mask), d_ref, ref_mask)
    assert empty.similarity == 0
    empty.similarity.backward()
    assert d_gen.grad.abs().sum() == 0
