"""Privacy accounting for DP-SGD, and the pieces of a private training run.

Three accountants of the Poisson-subsampled Gaussian mechanism behind one interface
(:mod:`.accountant`): ``rdp`` (:mod:`.renyi`, Rényi DP; Mironov et al.), ``prv`` (:mod:`.prv`,
privacy-loss random variables composed by FFT; Gopi, Lee & Wutschitz 2021) and ``gdp``
(:mod:`.gdp`, μ-GDP with the Poisson CLT; Dong, Roth & Su, Bu et al.)::

    from aam_func import privacy
    acc = privacy.accountant("prv")
    sigma = acc.noise_for(target_epsilon=2.0, sample_rate=0.004, steps=1000, delta=1e-5)
    privacy.epsilon(steps=1000, sample_rate=0.004, noise_multiplier=sigma, delta=1e-5)   # RDP's ε

The RDP functions of the first version (``rdp``, ``epsilon``, ``epsilon_from_rdp``,
``noise_multiplier_for``, ``DEFAULT_ORDERS``) stay here unchanged. Derivations:
``proofs/privacy.md`` (RDP) and ``proofs/privacy_accountants.md`` (PRV, GDP, adaptive clipping).
"""

from . import accountant as accountants
from . import gdp, prv, renyi, search
from .accountant import ACCOUNTANTS, Accountant, accountant, epsilon_for
from .renyi import DEFAULT_ORDERS, epsilon, epsilon_from_rdp, noise_multiplier_for, rdp

__all__ = [
    "DEFAULT_ORDERS",
    "rdp",
    "epsilon_from_rdp",
    "epsilon",
    "noise_multiplier_for",
    "ACCOUNTANTS",
    "Accountant",
    "accountant",
    "epsilon_for",
]
