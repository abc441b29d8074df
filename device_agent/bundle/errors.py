"""One error hierarchy for everything that can be wrong with a bundle.

Every class is named after what went wrong, and every message says what a
person can do about it. Foreign exceptions are wrapped at the boundary with
``raise ... from e`` so the cause stays visible in tracebacks.
"""

from __future__ import annotations


class BundleError(Exception):
    """Root of all bundle errors. A bundle that raises this was not installed."""

    #: short stable code used in CLI output, reports and telemetry events
    code = "bundle_error"


class MalformedBundleError(BundleError):
    """The file is not a well-formed edgefleet bundle (bad header, bad JSON, bad layout)."""

    code = "malformed"


class TruncatedBundleError(MalformedBundleError):
    """The bundle ends before its members do (an interrupted download or copy)."""

    code = "truncated"


class HeaderFieldError(MalformedBundleError):
    """A container header field is not in its one accepted encoding or fixed value
    (a signed or negative size, a setuid mode, a non-zero mtime, bytes after a name)."""

    code = "bad_header_field"


class ManifestError(MalformedBundleError):
    """The manifest is signed but does not follow the manifest schema."""

    code = "bad_manifest"


class SignatureError(BundleError):
    """Base for failures of the manifest's signatures against the trust store."""

    code = "signature"


class UnsignedBundleError(SignatureError):
    """The bundle carries no signature at all."""

    code = "unsigned"


class UntrustedKeyError(SignatureError):
    """Every signature is by a key the device's trust store does not know."""

    code = "untrusted_key"


class RevokedKeyError(SignatureError):
    """The bundle is signed by a key the trust store lists as revoked."""

    code = "revoked_key"


class BadSignatureError(SignatureError):
    """A trusted key's signature does not match the manifest bytes (edited after signing)."""

    code = "bad_signature"


class ThresholdNotMetError(SignatureError):
    """Fewer distinct trusted keys signed than the trust store's threshold requires."""

    code = "threshold_not_met"


class ExpiredBundleError(BundleError):
    """The bundle's expiry time has passed (stale metadata: a freeze attack or an old file)."""

    code = "expired"


class RollbackError(BundleError):
    """The bundle's version is lower than the one installed (anti-rollback)."""

    code = "rollback"


class MemberError(BundleError):
    """Base for problems with one member (file) inside the bundle."""

    code = "member"


class UnsafePathError(MemberError):
    """A member name is absolute, contains ``..`` or a directory separator."""

    code = "unsafe_path"


class UnsafeMemberTypeError(MemberError):
    """A member is a link, a device node, a FIFO or a directory rather than a regular file."""

    code = "unsafe_member_type"


class UnlistedMemberError(MemberError):
    """A member is present in the bundle but not listed in the signed manifest."""

    code = "unlisted_member"


class MissingMemberError(MemberError):
    """A file the manifest lists is absent from the bundle."""

    code = "missing_member"


class OversizedMemberError(MemberError):
    """A member is larger than the manifest says or than the configured cap (endless data)."""

    code = "oversized"


class MemberSizeMismatchError(MemberError):
    """A member is smaller than the manifest says."""

    code = "size_mismatch"


class MemberHashMismatchError(MemberError):
    """A member's sha256 differs from the manifest (tampered or swapped-in file)."""

    code = "hash_mismatch"


class StagingError(BundleError):
    """The verified bundle could not be written to the staging area (disk full, permissions)."""

    code = "staging"


class NoSpaceError(StagingError):
    """The disk has no room to stage the bundle; nothing was changed, retry when it has."""

    code = "no_space"


class BindingError(BundleError):
    """A validly signed bundle that is not meant for this device or this slot."""

    code = "binding"


class WrongModelError(BindingError):
    """The bundle is of another model name than the one this device runs in the slot."""

    code = "wrong_model"


class WrongDeviceClassError(BindingError):
    """The bundle does not list this device's class among its target device classes."""

    code = "wrong_device_class"


class VersionReusedError(RollbackError):
    """The bundle has the installed version of its model but different signed contents."""

    code = "version_reused"
