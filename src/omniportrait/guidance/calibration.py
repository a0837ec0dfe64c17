"""What the guidance did at each guided step, in numbers a user can calibrate the strength ``p`` with."""

from __future__ import annotations

from statistics import median

# Per guided step and identity: S/|M_ref| (the mean match score, in [0, 1]), |M_gen| and |M_ref| (feature-map points),
# and ‖M_gen ⊙ ∇E‖ / ‖ε_cfg‖ (how far the guidance moves the noise, relative to the noise)
CALIBRATION_FIELDS = ("mean_similarity", "gen_mask_points", "ref_mask_points", "gradient_to_noise")


def calibration_line(steps: list[dict], strength: float) -> str:
    """One line over a generation's guided steps: the mean match score first → last, the mask sizes, and the
    median and largest gradient-to-noise ratio (docs/guidance.md, "Calibrating p")."""
    if not steps:
        return "  RB-Guidance: no guided step computed a gradient"
    parts = []
    for index in range(len(steps[0]["identities"])):
        rows = [step["identities"][index] for step in steps]
        ratios = [row["gradient_to_noise"] for row in rows]
        parts.append(f"identity {index}: match {rows[0]['mean_similarity']:.3f}→{rows[-1]['mean_similarity']:.3f}, "
                     f"|M_gen| {median(row['gen_mask_points'] for row in rows):.0f} / |M_ref| "
                     f"{rows[0]['ref_mask_points']:.0f} points, ‖M∇E‖/‖ε‖ median {median(ratios):.2e} "
                     f"max {max(ratios):.2e}")
    return f"  RB-Guidance (p={strength:g}, {len(steps)} gradient steps): " + "; ".join(parts)
