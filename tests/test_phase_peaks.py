"""PhasePeaks: the resident memory of a phase, read by its sampling thread, against a tensor of known
size (256 MiB) allocated inside it; nested phases hand the phase back to the one they interrupted."""

import platform
import time

import pytest
import torch

from recursify.util.memory import PhasePeaks, rss_bytes

MiB = 2**20


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/status")
def test_a_phase_peak_sees_a_tensor_alive_only_inside_it():
    peaks = PhasePeaks(interval=0.01, phase="outside")
    seen = []

    def big():
        x = torch.ones(64 * MiB)  # 256 MiB of float32, filled: resident
        time.sleep(0.2)
        seen.append(peaks.phase)
        return float(x[0])

    def wrapper():
        out = peaks.during("big", big)()
        seen.append(peaks.phase)
        return out

    time.sleep(0.05)
    assert peaks.during("wrapper", wrapper)() == 1.0
    seen.append(peaks.phase)
    time.sleep(0.05)
    peaks.close()
    assert seen == ["big", "wrapper", "outside"]
    assert peaks.peaks["big"] - peaks.peaks["outside"] >= 250 * MiB, peaks.peaks
    assert peaks.peaks["wrapper"] < peaks.peaks["big"] - 200 * MiB  # the tensor is gone when "big" ends
    assert peaks.seconds["big"] >= 0.2
    assert abs(rss_bytes() - peaks.peaks["outside"]) < 100 * MiB
