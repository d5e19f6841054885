//! The S3 client's TCP connections: ureq's pooled connections, with two changes that matter
//! on a fast network (a server on the same host or rack):
//!
//! - **No delayed ACK stall.** A server that writes a response's headers and its body in
//!   two writes without `TCP_NODELAY` (s3s-fs does, for every GET) holds the body back
//!   (Nagle) until the client acknowledges the headers, and a kept-alive connection's
//!   client delays that acknowledgement by up to 40 ms. A restore reads thousands of small
//!   objects over kept-alive connections: that was 40 ms each, 3x the time of bare
//!   downloads on fresh connections. `TCP_QUICKACK` is set before every read (Linux clears
//!   it again as it sees fit), so acknowledgements go out at once: one small packet more
//!   per response at most.
//! - **No resolver thread for an IP address.** ureq resolves each request's host on a new
//!   thread when a timeout is set; an endpoint given as an IP address needs no lookup.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Arc, Weak};

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, RustlsConnector,
    ShutdownHandle, Transport,
};

/// The connector chain: TCP (ours), then rustls for `https`.
pub(super) fn connector() -> impl Connector {
    ().chain(Tcp).chain(RustlsConnector::default())
}

/// Opens TCP connections to the resolved addresses, in order (see the module docs).
#[derive(Debug)]
pub(super) struct Tcp;

impl<In: Transport> Connector<In> for Tcp {
    type Out = Either<In, TcpTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if let Some(c) = chained {
            return Ok(Some(Either::A(c)));
        }
        let timeout = details.timeout.not_zero().map(|d| *d);
        let mut last = None;
        for addr in details.addrs.iter() {
            let r = match timeout {
                Some(t) => TcpStream::connect_timeout(addr, t),
                None => TcpStream::connect(addr),
            };
            match r {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    let stream = Arc::new(s);
                    let handle: Weak<dyn ShutdownHandle> =
                        Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>;
                    (details.register_shutdown)(handle)?;
                    let cfg = details.config;
                    return Ok(Some(Either::B(TcpTransport {
                        stream,
                        buffers: LazyBuffers::new(
                            cfg.input_buffer_size(),
                            cfg.output_buffer_size(),
                        ),
                    })));
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    last = Some(ureq::Error::Timeout(details.timeout.reason));
                }
                Err(e) => last = Some(e.into()),
            }
        }
        Err(last.unwrap_or(ureq::Error::ConnectionFailed))
    }
}

/// One connection (see [`Tcp`]).
pub(super) struct TcpTransport {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

/// Acknowledge received segments at once (see the module docs); best effort.
fn quickack(s: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: nix::libc::c_int = 1;
        // SAFETY: a valid socket descriptor and an int option of the right size.
        unsafe {
            nix::libc::setsockopt(
                s.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_QUICKACK,
                (&one as *const nix::libc::c_int).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = s;
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

impl Transport for TcpTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let t = timeout.not_zero().map(|d| *d);
        self.stream.set_write_timeout(t)?;
        let out = &self.buffers.output()[..amount];
        match (&*self.stream).write_all(out) {
            Ok(()) => Ok(()),
            Err(e) if timed_out(&e) => Err(ureq::Error::Timeout(timeout.reason)),
            Err(e) => Err(e.into()),
        }
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let t = timeout.not_zero().map(|d| *d);
        self.stream.set_read_timeout(t)?;
        quickack(&self.stream);
        let input = self.buffers.input_append_buf();
        let n = loop {
            match (&*self.stream).read(input) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => return Err(ureq::Error::Timeout(timeout.reason)),
                Err(e) => return Err(e.into()),
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        // an idle pooled connection is usable when nothing (no EOF, no stray bytes) waits
        let s = &*self.stream;
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let open = matches!((&*self.stream).read(&mut b),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        open && s.set_nonblocking(false).is_ok()
    }
}

/// ureq's resolver, without its thread for a host that is an IP address.
#[derive(Debug, Default)]
pub(super) struct Resolve(DefaultResolver);

impl Resolver for Resolve {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let host = uri.host().unwrap_or("");
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>();
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        match (ip, port) {
            (Ok(ip), Some(port)) => {
                let mut v = self.0.empty();
                v.push(SocketAddr::new(ip, port));
                Ok(v)
            }
            _ => self.0.resolve(uri, config, timeout),
        }
    }
}
