//! Builds the kernel forwarding program (bpf/relay.bpf.c) with clang when clang is there.
//! Without clang (or with `SWITCHBOARD_BPF=off`) an empty object is written and the node relays
//! RTP in user space only; `--kernel-forwarding on` then refuses to start and says why.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/relay.bpf.c");
    println!("cargo:rerun-if-env-changed=SWITCHBOARD_BPF");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("relay.bpf.o");
    let _ = std::fs::remove_file(&out);
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let built = std::env::var("SWITCHBOARD_BPF").as_deref() != Ok("off")
        && Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
            .args(["-O2", "-g", "-Wall", "-target", "bpf", "-c", "bpf/relay.bpf.c", "-o"])
            .arg(&out)
            .arg(format!("-I/usr/include/{arch}-linux-gnu"))
            .status()
            .is_ok_and(|status| status.success());
    if !built {
        println!("cargo:warning=clang (with -target bpf) not available: kernel RTP forwarding is not built in");
        std::fs::write(&out, b"").expect("write the empty BPF object");
    }
}
