//! The built-in guest images, built from guest/ at build time.
