//! Link the `emo` binary as a position-dependent executable on Linux x86-64. A PIE makes the
//! dynamic loader apply ~13,000 relative relocations at start-up, which touches the whole
//! relocation table and dirties every page of `.data.rel.ro` (~0.6 MB of resident memory for
//! `emo predict`, whose peak RSS has a budget). The code is unchanged (still PIC).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-linux-gnu" {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
