"""What a device trusts beyond a bundle's signature: which model and device class a
bundle must be for, the per-model floor, the origin its credential may go to."""
