"""The media benchmark's report: the targets it checks, the tables it prints and
the chart it draws, from the result :func:`benchmarks.media.measure` returns
(or a saved ``media*.json``, for ``--chart-only``)."""

from __future__ import annotations

from typing import Dict

import numpy as np

from tests.images import size_label

from .media_shapes import log

#: the copiers of the report, in table order
READERS = ("qcow2py guest", "qcow2py host", "qcow2py-copy host, strace", "qemu-img")
QDS = (1, 32)                # queue depths of the SSD models (and the chart)
HDD_QDS = (1, 2, 32)         # ... of the HDD model: 2 is qcow2py-copy's two worker threads
#: the targets of the report
TARGET_FLOOR = 1.05          # host order on the HDD within this factor of the floor
TARGET_VS_QEMU = 5.0         # host order at least this much faster than qemu-img at QD 32


def targets(readers: Dict, floor: Dict) -> Dict:
    host, guest, qemu = readers["qcow2py host"], readers["qcow2py guest"], readers["qemu-img"]
    host_hdd = host["hdd_qd1"]          # the traced copy issues one request at a time
    t = {"host_over_floor": host_hdd / floor["hdd"],
         "span_over_allocated": floor["span_bytes"] / floor["bytes"],
         "sorted_extents_over_floor": floor["sorted_extents_hdd"] / floor["hdd"],
         "host_over_sorted_extents": host_hdd / floor["sorted_extents_hdd"],
         "qemu_qd32_over_host": qemu["hdd_qd32"] / host_hdd,
         "qemu_qd32_over_floor": qemu["hdd_qd32"] / floor["hdd"],
         "ssd_host_le_guest": all(host[f"{k}_qd{q}"] <= guest[f"{k}_qd{q}"] * (1 + 1e-9)
                                  for k in ("sata", "nvme") for q in QDS)}
    t["floor_met"] = t["host_over_floor"] <= TARGET_FLOOR
    t["qemu_met"] = t["qemu_qd32_over_host"] >= TARGET_VS_QEMU
    return t


def format_table(result: Dict) -> str:
    head = ["image", "reader", "reads", "MiB", "HDD QD1 s", "HDD QD2 s", "HDD QD32 s",
            "QD1 ÷ floor",
            "SATA SSD QD1 s", "SATA SSD QD32 s", "NVMe QD1 s", "NVMe QD32 s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, s in result["shapes"].items():
        f = s["floor"]
        lines.append("| " + " | ".join([
            shape, "*floor* (allocated bytes, sequential)", "", f"{f['bytes'] / 2**20:.0f}",
            f"{f['hdd']:.2f}", "", "", "1.00", f"{f['sata']:.3f}",
            f"{f['sata']:.3f}", f"{f['nvme']:.3f}", f"{f['nvme']:.3f}", ""]) + " |")
        lines.append("| " + " | ".join([
            shape, "*data span* (first to last data byte, sequential)", "",
            f"{f['span_bytes'] / 2**20:.0f}", f"{f['span_hdd']:.2f}", "", "",
            f"{f['span_hdd'] / f['hdd']:.2f}", "", "", "", "", ""]) + " |")
        lines.append("| " + " | ".join([
            shape, "*sorted extents* (one sweep of what must be read)", "",
            f"{f['visible_bytes'] / 2**20:.0f}", f"{f['sorted_extents_hdd']:.2f}", "", "",
            f"{f['sorted_extents_hdd'] / f['hdd']:.2f}", "", "", "", "", ""]) + " |")
        for label in READERS:
            r = s["readers"][label]
            lines.append("| " + " | ".join([
                shape, label, str(r["requests"]), f"{r['bytes'] / 2**20:.0f}",
                f"{r['hdd_qd1']:.2f}", f"{r['hdd_qd2']:.2f}", f"{r['hdd_qd32']:.2f}",
                f"{r['hdd_qd1'] / f['hdd']:.2f}",
                f"{r['sata_qd1']:.3f}", f"{r['sata_qd32']:.3f}", f"{r['nvme_qd1']:.3f}",
                f"{r['nvme_qd32']:.3f}", f"{r['wall']:.2f}" if "wall" in r else "–"]) + " |")
    return "\n".join(lines)


def format_targets(result: Dict) -> str:
    lines = ["| image | host ÷ floor (HDD) | span ÷ allocated | sorted extents ÷ floor "
             "| host ÷ sorted extents | qemu-img QD32 ÷ host (HDD) "
             "| qemu-img QD32 ÷ floor | host ≤ guest (SSD) |", "|---|---|---|---|---|---|---|---|"]
    for shape, s in result["shapes"].items():
        t = s["targets"]
        lines.append(f"| {shape} | {t['host_over_floor']:.3f} "
                     f"({'met' if t['floor_met'] else 'MISSED'}, ≤ {TARGET_FLOOR}) | "
                     f"{t['span_over_allocated']:.3f} | {t['sorted_extents_over_floor']:.3f} | "
                     f"{t['host_over_sorted_extents']:.3f} | "
                     f"{t['qemu_qd32_over_host']:.1f}× "
                     f"({'met' if t['qemu_met'] else 'MISSED'}, ≥ {TARGET_VS_QEMU:g}) | "
                     f"{t['qemu_qd32_over_floor']:.1f}× | "
                     f"{'yes' if t['ssd_host_le_guest'] else 'NO'} |")
    rows = result.get("footprint")
    if rows:
        lines.append("")
        lines.append("Random 64 KiB reads over a span ÷ the same bytes read sequentially "
                     "(HDD model; the most a host-order copy can gain on a shuffled image "
                     "of that size):")
        lines.append("| span | QD1 | QD32 |")
        lines.append("|---|---|---|")
        for r in rows:
            lines.append(f"| {r['span'] / 2**30:g} GiB | {r['qd1']:.1f}× | {r['qd32']:.1f}× |")
    return "\n".join(lines)


def visible_floor(result: Dict, shape: str, key: str) -> float:
    """The time to read, sequentially, the bytes a copy of ``shape`` must read on
    disk model ``key`` (results written before this floor was recorded: derived
    from the visible bytes and the model's rate)."""
    f = result["shapes"][shape]["floor"]
    if f"visible_{key}" in f:
        return f[f"visible_{key}"]
    if key == "hdd":
        return f["hdd"] * f["visible_bytes"] / f["bytes"]
    return f["visible_bytes"] / result["models"][key]["read_bw"]


def chart(result: Dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no chart")
        return False
    shapes = list(result["shapes"])
    colors = {"qcow2py guest": "#9e9e9e", "qcow2py host": "#1f77b4", "qemu-img": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), dpi=80)
    panels = (("hdd", "7200 rpm HDD model (log scale)", True),
              ("sata", "SATA SSD model", False), ("nvme", "NVMe SSD model", False))
    for ax, (key, title, log_scale) in zip(axes, panels):
        x = np.arange(len(shapes))
        w = 0.13
        k = 0
        for label in ("qcow2py guest", "qcow2py host", "qemu-img"):
            for qd in QDS:
                vals = [result["shapes"][s]["readers"][label][f"{key}_qd{qd}"] for s in shapes]
                ax.bar(x + (k - 2.5) * w, vals, w, color=colors[label],
                       alpha=1.0 if qd == 1 else 0.55, hatch="" if qd == 1 else "//",
                       label=f"{label} QD{qd}", edgecolor="white", linewidth=0.3)
                k += 1
        floors = [visible_floor(result, s, key) for s in shapes]
        lowest = [min(r[f"{key}_qd{qd}"] for r in result["shapes"][s]["readers"].values()
                      for qd in QDS if f"{key}_qd{qd}" in r) for s in shapes]
        for s, fl, lo in zip(shapes, floors, lowest):
            if lo < fl * (1 - 1e-6):
                log(f"chart: a {key} bar of {s} ({lo:.4f} s) lies under its floor ({fl:.4f} s)")
        ax.hlines(floors, x - 3 * w, x + 3 * w, colors="black", linewidth=1.5,
                  label="floor: the bytes a copy must read, read sequentially")
        ax.set_xticks(x)
        ax.set_xticklabels(shapes)
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, None)
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Disk model: time to read the source when copying "
                 f"{size_label(result['size'])} fragmented images (modelled from real "
                 f"request traces, not measured on a disk)", fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
