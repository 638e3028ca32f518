"""The paper's ablations as grid presets: which configurations each table trains, and its row labels."""
from __future__ import annotations

# The paper's ablations: preset name → (title, rows); a row is (label, overrides of the full model).
ABLATIONS: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "components": ("Table 3: components", [
        ("(1) FDC", {"use_frg": False, "use_pc": False}), ("(2) PC", {"use_fdc": False}),
        ("(3) FRG+FDC", {"use_pc": False}), ("(4) FDC+PC", {"use_frg": False}), ("(5) FRG+FDC+PC", {})]),
    "width": ("Table 4: hidden widths", [(f"FDC {w}", {"fdc_hidden": w}) for w in (16, 32, 64, 128)]
              + [(f"gates {w}", {"gate_hidden": w}) for w in (16, 64, 128)]),
    "depth": ("Table 5: gate depth", [(f"{n} layer{'s' if n > 1 else ''}", {"frg_layers": n, "brg_layers": n})
                                      for n in (1, 2, 3)]),
    "indicators": ("Table 6: indicators", [
        ("FRG w/o ΔH", {"frg_indicators": ("cos", "area")}), ("FRG w/o cos", {"frg_indicators": ("dH", "area")}),
        ("FRG w/o A(m)", {"frg_indicators": ("dH", "cos")}), ("BRG w/o entropies", {"brg_indicators": ("cos",)}),
        ("BRG w/o cos", {"brg_indicators": ("H_bb", "H_clip")}), ("all indicators", {})]),
    "losses": ("Table 12: losses", [
        ("w/o L_FRG", {"loss_frg": False}), ("w/o CE_FDC", {"loss_ce_fdc": False}), ("w/o L_dist", {"loss_dist": False}),
        ("w/o CE_PC", {"loss_ce_pc": False}), ("w/o KL_PC", {"loss_kl_pc": False}), ("all losses", {})]),
    "fdc-branches": ("Table 13: FDC branches", [("visual + textual", {"fdc_textual": True}),
                                                ("visual only", {"fdc_textual": False})]),
    "epochs": ("Table 15: epochs", [(f"{e} epochs", {"epochs": e}) for e in (10, 15, 20)]),
    "lambda": ("Fig. 4(b): λ_d", [(f"λ_d = {v:g}", {"lambda_d": v}) for v in (0.1, 1.0, 5.0, 10.0, 20.0)]),
    "data-fraction": ("Fig. 9: training data", [(f"{f:.0%} of the shots", {"data_fraction": f})
                                                for f in (0.25, 0.5, 0.75, 1.0)]),
    "foreground-control": ("Foreground control: where L_dist's r comes from", [
        ("r from FRG (FVG-PT)", {}), ("r = 0: full view", {"r_source": "full"}), ("r = 1: foreground", {"r_source": "fg"})]),
    # the paper's C.3 (the segmentation module): one row per mask source the cache holds, filled in per cache
    # by `grids.expand` (`mask_source_rows`); `reports.mask_source_tables` prints it with each source's mask statistics
    "masks": ("Mask sources: where the foreground views come from", []),
}
# presets whose rows depend on the cache, with the parameter their rows vary
CACHE_ROWS = {"masks": "fg_source"}


def mask_source_rows(sources: list[str]) -> list[tuple[str, dict]]:
    """The rows of `--preset masks` for a cache holding these mask sources."""
    return [(source, {"fg_source": source}) for source in sources]
PAPER = ("components", "width", "depth", "indicators", "losses", "fdc-branches", "epochs", "lambda", "data-fraction")
