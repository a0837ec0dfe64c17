"""The face localization loss trains the e_mix attention onto the face (docs/training.md has the curves).

On the tiny model the paper's lr 2e-5 and η 2e-3 leave the loss flat for hundreds of steps (a random UNet
gives the PIE nothing to gain from the diffusion term, whose gradient drowns η·L_loc), so this test uses
lr 3e-2 and η 100, and the tiny VAE sharpened so that its latents hold the picture.
"""

from omniportrait.training.convergence import measure

from .conftest import tiny_config

STEPS = 150


def test_localization_loss_halves_and_the_map_follows_the_mask(tmp_path):
    config = tiny_config(tmp_path / "data", tmp_path / "run", max_steps=STEPS, batch_size=4, learning_rate=3e-2,
                         eta=100.0, log_every=25, checkpoint_every=STEPS)
    curve = measure(config, probe_every=25)
    start, final = curve[0], curve[-1]
    best = min(curve[1:], key=lambda point: point.localization_loss)
    for point in curve:  # shown with pytest -s
        ratio = point.localization_loss / start.localization_loss
        print(f"step {point.step:3d}  loc {point.localization_loss:.4f} ({ratio:.2f}x)  corr {point.correlation:+.3f}")
    assert final.step == STEPS
    assert abs(start.correlation) < 0.2  # the untrained map does not follow the mask
    assert best.localization_loss <= 0.5 * start.localization_loss
    assert best.correlation >= 0.5
    assert final.localization_loss <= 0.6 * start.localization_loss and final.correlation >= 0.4
