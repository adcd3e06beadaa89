"""Break the code on purpose and see which reference fixture catches it.

Each mutation replaces one piece of a plugin or recipe by a plausible mistake (a CFG scale in
the wrong convention, a weighting, a normalization in the wrong place, a ramp that does not
anneal, ...), runs the tests of ``tests/test_references.py`` that check that term, restores the
file and prints which tests failed. Every mutation must be caught; one that is not means the
fixtures do not pin what they claim::

    python benchmarks/reference_mutations.py            # all of them
    python benchmarks/reference_mutations.py I K2       # some, by label

It edits files in the working tree while it runs (and puts them back, also on Ctrl-C): run it
when nothing else uses this checkout.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: label, description, file, text, its mistaken replacement, the tests (-k) that must fail
MUTATIONS = [
    ("A", "SDS in threestudio's CFG form", "plugins/sds.py",
     "guided = cfg(e_uncond, e_cond, self.config.guidance_scale)",
     "guided = e_cond + self.config.guidance_scale * (e_cond - e_uncond)", "test_sds"),
    ("B", "NFSD's correction sign", "plugins/nfsd.py", "return self.nfsd(z, times.t, self.config.correction_scale)",
     "return self.nfsd(z, times.t, -self.config.correction_scale)", "test_nfsd"),
    ("C", "ISM weighted by 1 - abar", "recipes/ism.yaml", "name: sigma-over-alpha", "name: one-minus-alpha-bar",
     "test_ism"),
    ("D", "ISM without offset noise", "plugins/ism.py", "noise + self.config.offset_noise * offset", "noise",
     "test_ism"),
    ("E", "ISM's delta_T not annealed", "recipes/ism.yaml", "interval: {start: 100, end: 80, until: 0.3}",
     "interval: 100", "test_ism"),
    ("E2", "ISM's t_max not annealed", "recipes/ism.yaml", "t_max: {start: 979, end: 499, until: 0.3}",
     "t_max: 979", "test_ism"),
    ("E3", "ISM inverted from the clean latent", "recipes/ism.yaml", "noised_start: true", "noised_start: false",
     "test_ism"),
    ("F", "CSD weighted after normalizing", "recipes/csd.yaml", "name: uniform", "name: one-minus-alpha-bar",
     "test_csd"),
    ("G", "CSD not normalized", "recipes/csd.yaml", "normalize: true", "normalize: false", "test_csd"),
    ("H", "CSD's ramps over the whole run", "recipes/csd.yaml", "u: {start: 0.0, end: -1.0, until: 0.5}",
     "u: {start: 0.0, end: -1.0}", "test_csd"),
    ("H2", "CSD without its t_max switch", "recipes/csd.yaml", "t_max: {start: 980, end: 500, begin: 0.5, until: 0.5}",
     "t_max: 980", "test_csd"),
    ("I", "SDI's inversion scale in threestudio's number", "recipes/sdi.yaml", "inversion_guidance_scale: -6.5",
     "inversion_guidance_scale: -7.5", "test_sdi"),
    ("J", "SDI's guidance scale off by one", "recipes/sdi.yaml", "guidance_scale: 8.5", "guidance_scale: 7.5",
     "test_sdi"),
    ("K", "SDI without eta", "recipes/sdi.yaml", "inversion_eta: 0.3", "inversion_eta: 0.0", "test_sdi"),
    ("K2", "SDI without overshoot", "recipes/sdi.yaml", "overshoot: true", "overshoot: false", "test_sdi"),
    ("L", "SDI's noise at t + delta", "plugins/sdi.py", "noise = (x_inv - a[t].sqrt() * z) / (1 - a[t]).sqrt()",
     "noise = (x_inv - a[path[-1]].sqrt() * z) / (1 - a[path[-1]]).sqrt()", "test_sdi"),
    ("L2", "SDI weighted by 1 - abar", "recipes/sdi.yaml", "name: sigma-over-alpha", "name: one-minus-alpha-bar",
     "test_sdi"),
    ("M", "ASD's shift from a fixed t = 20", "recipes/asd.yaml", "random: true\n", "random: true\n  shift_t_min: 20\n",
     "test_asd"),
    ("N", "ASD's sign", "plugins/asd.py", "score=guided - e_shifted", "score=e_shifted - guided", "test_asd"),
    ("N2", "ASD's range not annealed", "recipes/asd.yaml", "t_max: {start: 980, end: 500}", "t_max: 980", "test_asd"),
    ("O", "SDS-Bridge's stage-two sign", "plugins/sds_bridge.py", "direction = s * (second - first)",
     "direction = s * (first - second)", "test_sds_bridge"),
    ("P", "VSD's CFG scale off by one", "plugins/vsd.py",
     "pretrained = cfg(e_uncond, e_cond, self.config.guidance_scale)",
     "pretrained = cfg(e_uncond, e_cond, self.config.guidance_scale + 1)", "test_vsd"),
    ("Q", "sigma-over-alpha without its square root", "plugins/weightings.py",
     "self.table = ((1 - a) / a).sqrt().tolist()", "self.table = ((1 - a) / a).tolist()", "test_ism or test_sdi"),
]


def main(labels: list[str]) -> int:
    missed = []
    for label, what, file, text, mistake, tests in MUTATIONS:
        if labels and label not in labels:
            continue
        path = ROOT / file
        original = path.read_text()
        if original.count(text) != 1:
            print(f"{label} {what}: the text to mutate is not in {file} once; update this table")
            return 2
        try:
            path.write_text(original.replace(text, mistake))
            out = subprocess.run([sys.executable, "-m", "pytest", "tests/test_references.py", "-q", "-k", tests,
                                  "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True).stdout
        finally:
            path.write_text(original)
        failed = [line.split("::")[1].split(" ")[0] for line in out.splitlines() if line.startswith("FAILED")]
        print(f"{label} {what}: {'caught by ' + ', '.join(failed) if failed else 'NOT CAUGHT'}", flush=True)
        missed += [] if failed else [label]
    print(f"not caught: {missed}" if missed else "every mutation was caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
