"""Private keys: the types the box makes and accepts, generation, and PEM with an optional passphrase."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs.errors import BadInput, WrongPassword

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# ECDSA P-256 by default: fast to make and to sign with, small handshakes, and accepted by every
# iOS and Android release still in use. RSA is there for old clients and appliances that lack ECDSA.
DEFAULT_KEY_TYPE = "ec-p256"
KEY_TYPES = ("ec-p256", "rsa-2048", "rsa-3072")

_CURVES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}
_MIN_RSA_BITS = 2048  # what iOS, Android and current OpenSSL security levels still accept


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A new private key of one of KEY_TYPES."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise BadInput(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def key_type_of(key: object) -> str:
    """The type name of a private or public key ("ec-p256", "rsa-3072", ...); BadInput if unsupported."""
    public = key.public_key() if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)) else key
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _CURVES:
        return _CURVES[public.curve.name]
    if isinstance(public, rsa.RSAPublicKey) and public.key_size >= _MIN_RSA_BITS:
        return f"rsa-{public.key_size}"
    raise BadInput(f"unsupported key ({type(public).__name__}); use ECDSA P-256/P-384/P-521 "
                   f"or RSA of {_MIN_RSA_BITS} bits or more")


def keys_match(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether `key` is the private half of the public key in `cert`."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def key_to_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with the best algorithm available when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def is_encrypted_pem(data: bytes) -> bool:
    """Whether a PEM private key is passphrase-protected (PKCS#8 or the older OpenSSL header form)."""
    return b"ENCRYPTED" in data


def key_from_pem(data: bytes, passphrase: bytes | None, *, what: str) -> PrivateKey:
    """Load a PEM private key; `what` names it in errors ("the CA key", "ca.key")."""
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:
        if passphrase is None:
            raise WrongPassword(f"{what} is encrypted: give its passphrase") from None
        # A passphrase for a key that has none: the key is usable as it is.
        key = serialization.load_pem_private_key(data, None)
    except ValueError as e:
        if is_encrypted_pem(data):
            raise WrongPassword(f"the passphrase does not open {what}") from None
        raise BadInput(f"{what} is not a PEM private key ({e})") from None
    except Exception as e:  # noqa: BLE001 - cryptography raises UnsupportedAlgorithm and friends
        raise BadInput(f"{what} cannot be loaded ({e})") from None
    key_type_of(key)
    return key  # type: ignore[return-value]
