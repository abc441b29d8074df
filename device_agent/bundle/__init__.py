"""Bundle format v1: reading and verifying signed model bundles.

The device owns this code because the device is the party that must trust a
bundle. Writing and signing bundles lives in :mod:`converters.bundle`.
"""

from .errors import (
    BadSignatureError,
    BundleError,
    ExpiredBundleError,
    HeaderFieldError,
    MalformedBundleError,
    ManifestError,
    MemberError,
    MemberHashMismatchError,
    MemberSizeMismatchError,
    MissingMemberError,
    OversizedMemberError,
    RevokedKeyError,
    RollbackError,
    SignatureError,
    StagingError,
    ThresholdNotMetError,
    TruncatedBundleError,
    UnlistedMemberError,
    UnsafeMemberTypeError,
    UnsafePathError,
    UnsignedBundleError,
    UntrustedKeyError,
)
from .install import unpack_bundle, verify_file
from .manifest import FileEntry, Manifest, Quantization, TensorSpec, canonical_json
from .trust import Signature, TrustStore, key_id
from .verify import MemberSink, VerifiedBundle, VerifyLimits, verify_bundle

__all__ = [
    "BadSignatureError",
    "BundleError",
    "ExpiredBundleError",
    "FileEntry",
    "HeaderFieldError",
    "MalformedBundleError",
    "Manifest",
    "ManifestError",
    "MemberError",
    "MemberHashMismatchError",
    "MemberSink",
    "MemberSizeMismatchError",
    "MissingMemberError",
    "OversizedMemberError",
    "Quantization",
    "RevokedKeyError",
    "RollbackError",
    "Signature",
    "SignatureError",
    "StagingError",
    "TensorSpec",
    "ThresholdNotMetError",
    "TruncatedBundleError",
    "TrustStore",
    "UnlistedMemberError",
    "UnsafeMemberTypeError",
    "UnsafePathError",
    "UnsignedBundleError",
    "UntrustedKeyError",
    "VerifiedBundle",
    "VerifyLimits",
    "canonical_json",
    "key_id",
    "unpack_bundle",
    "verify_bundle",
    "verify_file",
]
