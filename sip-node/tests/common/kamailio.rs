//! Kamailio (Debian's `kamailio`) run from a configuration template under `tests/kamailio/`,
//! stopped with SIGTERM on drop (its worker processes go too).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Kamailio {
    child: Child,
    dir: tempfile::TempDir,
}

impl Kamailio {
    /// Starts `tests/kamailio/<template>` with `@KPORT@` set to `port` and the other
    /// `(placeholder, value)` pairs filled in; waits (bounded) until it answers OPTIONS.
    pub fn start(template: &str, port: u16, fill: &[(&str, String)]) -> Kamailio {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kamailio").join(template);
        let mut config = std::fs::read_to_string(path).expect("read the Kamailio template");
        config = config.replace("@KPORT@", &port.to_string());
        for (placeholder, value) in fill {
            config = config.replace(placeholder, value);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kamailio.cfg");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("kamailio.log")).unwrap();
        let child = Command::new("kamailio")
            .args(["-DD", "-E", "-m", "32", "-M", "8", "-Y"])
            .arg(dir.path())
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("kamailio (Debian package kamailio) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let options = format!(
            "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKprobe\r\n\
             From: <sip:probe@127.0.0.1>;tag=p\r\nTo: <sip:127.0.0.1:{port}>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\n\
             Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            probe.local_addr().unwrap().port()
        );
        let mut buf = [0u8; 2048];
        let mut kamailio = Kamailio { child, dir };
        loop {
            probe.send_to(options.as_bytes(), ("127.0.0.1", port)).unwrap();
            if probe.recv_from(&mut buf).is_ok() {
                return kamailio;
            }
            if Instant::now() >= deadline {
                super::terminate(&mut kamailio.child);
                panic!("kamailio did not start");
            }
        }
    }

    /// Kamailio's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kamailio.log")).unwrap_or_default()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        super::terminate(&mut self.child);
    }
}
