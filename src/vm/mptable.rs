//! The MP table (Intel MultiProcessor Specification 1.4) written for the guest.
