//! Library side of the `tether` command: building blocks shared by its subcommands.
//!
//! [`proxy`] is a fault-injecting TCP proxy that `tether demo` places between a client and a
//! server to cut connections at random (but reproducible) moments.

pub mod proxy;
