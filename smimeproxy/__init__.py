"""smimeproxy: gateway-level S/MIME for organisations.

Private keys live in one hardened key store; signing, encryption, decryption and
verification happen at the edge of the mail system (NIST SP 800-177 section 5.3.1.1).
"""

__version__ = "0.1.0"
