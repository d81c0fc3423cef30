//! The handshake that opens a link (authentication, then hello, then the
//! pulse offer), and reading checked frames off the stream.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::stream::{Encoded, Inbound, Outbound};
use super::{LinkConfig, LinkError};
use crate::auth::{self, Nonce, Side};
use crate::frame::{Frame, FrameKind, MAX_LINK_PAYLOAD};
use crate::hello::{Hello, Refusal};
use crate::seal::{KeyExchange, Opener, Protection, Sealer};

/// Frame I/O on the whole stream, for the handshake (sealed once the key
/// exchange is done, on a sealed link).
struct HandshakeIo<'a> {
    stream: &'a mut TcpStream,
    peer: SocketAddr,
    inbound: Inbound,
    outbound: Outbound,
}

impl HandshakeIo<'_> {
    async fn write(&mut self, kind: FrameKind, payload: impl Into<Bytes>) -> Result<(), LinkError> {
        let peer = self.peer;
        let frame = Frame::new(kind, 0, payload);
        let then = match self.outbound.encode(peer, &frame)? {
            Encoded::Buffered => None,
            Encoded::Then(payload) => Some(payload),
        };
        let send = |source| LinkError::Send { peer, source };
        self.stream
            .write_all(&self.outbound.tx)
            .await
            .map_err(send)?;
        if let Some(payload) = then {
            self.stream.write_all(&payload).await.map_err(send)?;
        }
        Ok(())
    }

    /// A handshake frame: none is larger than the link's own frames
    /// ([`MAX_LINK_PAYLOAD`]), messages included, until the peer proved
    /// the pair secret.
    async fn read(&mut self) -> Result<Frame, LinkError> {
        read_frame_within(
            &mut *self.stream,
            self.peer,
            &mut self.inbound,
            MAX_LINK_PAYLOAD,
        )
        .await
    }

    /// The next frame, which must be of kind `expected`; a `Refusal` is the
    /// peer's reason to stop.
    async fn read_expecting(&mut self, expected: FrameKind) -> Result<Bytes, LinkError> {
        let frame = self.read().await?;
        match frame.kind {
            kind if kind == expected => Ok(frame.payload),
            FrameKind::Refusal => Err(refusal_error(self.peer, &frame.payload)),
            got => Err(LinkError::UnexpectedFrame {
                peer: self.peer,
                expected,
                got,
            }),
        }
    }

    /// Tells the peer why we stop, closes our direction and waits for the
    /// peer to close its own (so that our close does not reset the
    /// connection before the peer read the refusal). The caller bounds the
    /// wait.
    async fn refuse(&mut self, reason: Refusal) {
        warn!(peer = %self.peer, %reason, "refusing to pair");
        let sent = match reason.to_payload() {
            Ok(payload) => self.write(FrameKind::Refusal, payload).await,
            Err(source) => Err(LinkError::HandshakePayload {
                peer: self.peer,
                source,
            }),
        };
        if let Err(error) = sent {
            debug!(peer = %self.peer, %error, "refusal not sent");
            return;
        }
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let mut discard = [0u8; 1024];
        while matches!(self.stream.read(&mut discard).await, Ok(n) if n > 0) {}
    }
}

pub(super) fn refusal_error(peer: SocketAddr, payload: &[u8]) -> LinkError {
    match Refusal::from_payload(payload) {
        Ok(reason) => {
            warn!(%peer, %reason, "peer refused to pair");
            LinkError::PeerRefused { peer, reason }
        }
        Err(source) => LinkError::HandshakePayload { peer, source },
    }
}

/// Reads until `inbound` holds a whole frame (heartbeats included) whose
/// payload is at most `cap`.
async fn read_frame_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    peer: SocketAddr,
    inbound: &mut Inbound,
    cap: u32,
) -> Result<Frame, LinkError> {
    loop {
        if let Some(frame) = inbound.next_frame(peer, cap)? {
            return Ok(frame);
        }
        let n = reader
            .read_buf(&mut inbound.raw)
            .await
            .map_err(|source| LinkError::Receive { peer, source })?;
        if n == 0 {
            return Err(inbound.end_of_stream(peer));
        }
    }
}

/// Runs the handshake on `stream` as `side`; returns the peer's Hello and
/// whatever the peer already sent past the handshake.
/// What a finished handshake gives: the peer's Hello, the stream's state
/// in each direction (the keys of a sealed link, bytes already read past
/// the handshake), and the peer's pulse port with the link's pulse key
/// (when both ends offered pulses).
pub(super) struct Handshaken {
    pub hello: Hello,
    pub inbound: Inbound,
    pub outbound: Outbound,
    pub pulse: Option<(u16, [u8; 32])>,
}

/// The handshake without pulses (a peer that offers none).
#[cfg(test)]
pub(super) async fn handshake(
    stream: &mut TcpStream,
    side: Side,
    config: &LinkConfig,
) -> Result<(Hello, BytesMut), LinkError> {
    let done = handshake_with(stream, side, config, None).await?;
    Ok((done.hello, done.inbound.raw))
}

pub(super) async fn handshake_with(
    stream: &mut TcpStream,
    side: Side,
    config: &LinkConfig,
    pulse_port: Option<u16>,
) -> Result<Handshaken, LinkError> {
    let peer = stream
        .peer_addr()
        .map_err(|source| LinkError::PeerAddress { source })?;
    let mut io = HandshakeIo {
        stream,
        peer,
        inbound: Inbound::new(BytesMut::with_capacity(4096)),
        outbound: Outbound::new(512),
    };
    let stopped = match tokio::time::timeout(
        config.handshake_timeout,
        run_handshake(&mut io, side, config, pulse_port),
    )
    .await
    {
        Ok(Ok((hello, pulse))) => {
            return Ok(Handshaken {
                hello,
                inbound: io.inbound,
                outbound: io.outbound,
                pulse,
            })
        }
        Ok(Err(stopped)) => stopped,
        Err(_) => {
            return Err(LinkError::HandshakeTimeout {
                peer,
                after: config.handshake_timeout,
            })
        }
    };
    if let Some(reason) = stopped.refusal {
        // Delivering the refusal is best effort, in its own bounded time:
        // the error to report is the one that made us refuse.
        if tokio::time::timeout(config.handshake_timeout, io.refuse(reason))
            .await
            .is_err()
        {
            debug!(%peer, "peer did not close after our refusal");
        }
    }
    Err(stopped.error)
}

/// Why a handshake stopped, and what to tell the peer if anything.
struct HandshakeStop {
    error: LinkError,
    refusal: Option<Refusal>,
}

impl From<LinkError> for HandshakeStop {
    fn from(error: LinkError) -> Self {
        HandshakeStop {
            error,
            refusal: None,
        }
    }
}

async fn run_handshake(
    io: &mut HandshakeIo<'_>,
    side: Side,
    config: &LinkConfig,
    pulse_port: Option<u16>,
) -> Result<(Hello, Option<(u16, [u8; 32])>), HandshakeStop> {
    let peer = io.peer;
    if config.protection == Protection::Sealed {
        let (sealer, opener) = exchange_keys(io, side, config).await?;
        io.outbound.sealer = Some(sealer);
        io.inbound.opener = Some(opener);
        debug!(%peer, %side, "A-link sealed");
    }
    let my_nonce = Nonce::fresh().map_err(|source| LinkError::AuthSetup { peer, source })?;
    io.write(FrameKind::Challenge, my_nonce.as_bytes().to_vec())
        .await?;
    let their_nonce = match io.read().await? {
        frame if frame.kind == FrameKind::Challenge => frame.payload,
        frame if frame.kind == FrameKind::KeyExchange => {
            return Err(mismatch(peer, Protection::Plaintext, Protection::Sealed))
        }
        frame if frame.kind == FrameKind::Refusal => {
            return Err(refusal_error(peer, &frame.payload).into())
        }
        frame => {
            return Err(LinkError::UnexpectedFrame {
                peer,
                expected: FrameKind::Challenge,
                got: frame.kind,
            }
            .into())
        }
    };
    let their_nonce = Nonce::from_wire(&their_nonce).map_err(|source| HandshakeStop {
        refusal: Some(Refusal::ProtocolViolation(source.to_string())),
        error: LinkError::AuthenticationFailed { peer, source },
    })?;
    let proof = auth::prove(&config.secret, side, &their_nonce, &my_nonce);
    io.write(FrameKind::Response, proof.to_vec()).await?;
    let their_proof = io.read_expecting(FrameKind::Response).await?;
    auth::verify(
        &config.secret,
        side.other(),
        &my_nonce,
        &their_nonce,
        &their_proof,
    )
    .map_err(|source| HandshakeStop {
        refusal: Some(Refusal::AuthenticationFailed),
        error: LinkError::AuthenticationFailed { peer, source },
    })?;
    debug!(%peer, %side, "peer authenticated");

    let hello = config
        .hello
        .to_payload()
        .map_err(|source| LinkError::HandshakePayload { peer, source })?;
    io.write(FrameKind::Hello, hello).await?;
    let their_hello = io.read_expecting(FrameKind::Hello).await?;
    let their_hello = Hello::from_payload(&their_hello).map_err(|source| HandshakeStop {
        refusal: Some(Refusal::ProtocolViolation(source.to_string())),
        error: LinkError::HandshakePayload { peer, source },
    })?;
    config
        .hello
        .check_pairs_with(&their_hello)
        .map_err(|mismatch| HandshakeStop {
            refusal: Some(Refusal::Incompatible(mismatch.clone())),
            error: LinkError::Incompatible { peer, mismatch },
        })?;
    let offer = pulse_port.map_or_else(Bytes::new, |p| Bytes::copy_from_slice(&p.to_be_bytes()));
    io.write(FrameKind::Accepted, offer).await?;
    let accepted = io.read_expecting(FrameKind::Accepted).await?;
    // A peer that offers no pulse port (or an older one) gets none.
    let their_port = <[u8; 2]>::try_from(&accepted[..])
        .ok()
        .map(u16::from_be_bytes);
    let pulse = match (pulse_port, their_port) {
        (Some(_), Some(port)) => {
            let (connecting, accepting) = match side {
                Side::Connecting => (&my_nonce, &their_nonce),
                Side::Accepting => (&their_nonce, &my_nonce),
            };
            Some((port, auth::pulse_key(&config.secret, connecting, accepting)))
        }
        _ => None,
    };
    Ok((their_hello, pulse))
}

/// Refusing a peer that protects the link otherwise.
fn mismatch(peer: SocketAddr, ours: Protection, theirs: Protection) -> HandshakeStop {
    let error = LinkError::ProtectionMismatch {
        peer,
        ours: ours.name(),
        theirs: theirs.name(),
    };
    HandshakeStop {
        refusal: Some(Refusal::ProtocolViolation(format!(
            "this node runs the A-link {} and the peer {}: set the same mode on both nodes",
            theirs.name(),
            ours.name()
        ))),
        error,
    }
}

/// The key exchange of a sealed link ([`crate::seal`]): the connecting
/// side's message, the accepting side's answer. A peer without the pair
/// secret is refused (in plaintext: there are no keys to seal a refusal
/// with), and so is a peer that starts the plaintext handshake instead.
async fn exchange_keys(
    io: &mut HandshakeIo<'_>,
    side: Side,
    config: &LinkConfig,
) -> Result<(Sealer, Opener), HandshakeStop> {
    let peer = io.peer;
    let failed = |source| HandshakeStop {
        refusal: Some(Refusal::AuthenticationFailed),
        error: LinkError::KeyExchange { peer, source },
    };
    let mut exchange = KeyExchange::new(&config.secret, side)
        .map_err(|source| HandshakeStop::from(LinkError::KeyExchange { peer, source }))?;
    if side == Side::Connecting {
        let first = exchange.write().map_err(failed)?;
        io.write(FrameKind::KeyExchange, first).await?;
    }
    let theirs = match io.read().await? {
        frame if frame.kind == FrameKind::KeyExchange => frame.payload,
        frame if frame.kind == FrameKind::Challenge => {
            return Err(mismatch(peer, Protection::Sealed, Protection::Plaintext))
        }
        frame if frame.kind == FrameKind::Refusal => {
            return Err(refusal_error(peer, &frame.payload).into())
        }
        frame => {
            return Err(LinkError::UnexpectedFrame {
                peer,
                expected: FrameKind::KeyExchange,
                got: frame.kind,
            }
            .into())
        }
    };
    exchange.read(&theirs).map_err(failed)?;
    if side == Side::Accepting {
        let answer = exchange.write().map_err(failed)?;
        io.write(FrameKind::KeyExchange, answer).await?;
    }
    exchange
        .finish()
        .map_err(|source| HandshakeStop::from(LinkError::KeyExchange { peer, source }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;
    use crate::auth::{AuthError, PairSecret};
    use crate::frame::FrameError;
    use crate::hello::{Mismatch, Role};
    use crate::link::tests::{config, encoded, pair, plaintext, SECRET, WITHIN};
    use crate::link::{Link, LinkListener};

    /// Issue 9 (defect 4's last part): a stranger that opens with the
    /// header of a 64 MiB message is refused at once; before, the
    /// accepting side reserved 64 MiB for it and waited for the handshake's
    /// timeout (32 such strangers at once: 2 GiB).
    #[tokio::test]
    async fn a_stranger_announcing_a_huge_message_is_refused_before_anything_is_reserved() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stranger = tokio::spawn(async move {
            let mut raw = TcpStream::connect(addr).await.unwrap();
            let huge = Frame::message(64, 0, 0, vec![0u8; 64 << 20]).unwrap();
            let mut header = BytesMut::new();
            huge.encode_header(&mut header).unwrap();
            raw.write_all(&header).await.unwrap();
            // Stay connected, send nothing more.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let (stream, _) = listener.accept().await.unwrap();
        let accepting = config("node-a", Role::Primary, SECRET);
        let outcome = tokio::time::timeout(
            Duration::from_secs(2),
            Link::establish(stream, Side::Accepting, &accepting),
        )
        .await
        .expect("refused at once, not after the handshake's timeout");
        match outcome {
            Err(LinkError::Corrupt {
                source: FrameError::TooLong { len, max, .. },
                ..
            }) => {
                assert_eq!((len, max), (64 << 20, MAX_LINK_PAYLOAD));
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("paired with a stranger"),
        }
        stranger.abort();
    }

    #[tokio::test]
    async fn handshake_succeeds_and_both_sides_see_each_others_hello() {
        let a = config("node-a", Role::Primary, SECRET);
        let b = config("node-b", Role::Standby, SECRET);
        let (accepted, connected) = pair(a.clone(), b.clone()).await;
        let (accepted, connected) = (accepted.unwrap(), connected.unwrap());
        assert_eq!(accepted.peer_hello(), &b.hello);
        assert_eq!(connected.peer_hello(), &a.hello);
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        for protection in [Protection::Sealed, Protection::Plaintext] {
            let mut a = config("node-a", Role::Primary, SECRET);
            let mut b = config("node-b", Role::Standby, b"another-secret-of-the-wrong-pair");
            (a.protection, b.protection) = (protection, protection);
            let (accepted, connected) = pair(a, b).await;
            assert_refused_for_the_secret(protection, "accepting", accepted);
            assert_refused_for_the_secret(protection, "connecting", connected);
        }
    }

    fn assert_refused_for_the_secret(
        protection: Protection,
        side: &str,
        result: Result<Link, LinkError>,
    ) {
        {
            match result {
                // Sealed: the key exchange fails at the accepting side's
                // first read (its message carries a tag under the key the
                // pair secret gives), which refuses in plaintext.
                Err(LinkError::KeyExchange {
                    source: crate::seal::SealError::KeyExchange(_),
                    ..
                }) if protection == Protection::Sealed => {}
                // Each side checks the other's proof; the refusal of the
                // peer may also be what a side reads first.
                Err(LinkError::AuthenticationFailed {
                    source: AuthError::ProofRejected { .. },
                    ..
                })
                | Err(LinkError::PeerRefused {
                    reason: Refusal::AuthenticationFailed,
                    ..
                }) => {}
                Err(other) => panic!("{side} ({}): wrong error {other}", protection.name()),
                Ok(_) => panic!("{side}: paired with a wrong secret"),
            }
        }
    }

    /// Plays the peer of a handshake with a raw socket that answers with a
    /// bogus proof; returns everything the real side wrote.
    async fn capture_against_bogus_prover(raw: &mut TcpStream) -> Vec<u8> {
        let mut seen = Inbound::new(BytesMut::new());
        let peer = raw.peer_addr().unwrap();
        let challenge = read_frame_within(raw, peer, &mut seen, u32::MAX)
            .await
            .unwrap();
        assert_eq!(challenge.kind, FrameKind::Challenge);
        raw.write_all(&encoded(&Frame::new(
            FrameKind::Challenge,
            0,
            vec![9u8; 32],
        )))
        .await
        .unwrap();
        raw.write_all(&encoded(&Frame::new(FrameKind::Response, 0, vec![0u8; 32])))
            .await
            .unwrap();
        let mut wire = encoded(&challenge).to_vec();
        wire.extend_from_slice(&seen.raw);
        raw.read_to_end(&mut wire).await.unwrap();
        wire
    }

    fn assert_secret_absent_but_proof_sent(wire: &[u8]) {
        assert!(
            !wire.windows(SECRET.len()).any(|w| w == SECRET),
            "the pair secret went on the wire"
        );
        let mut buf = BytesMut::from(wire);
        let kinds: Vec<FrameKind> =
            std::iter::from_fn(|| crate::FrameDecoder.decode(&mut buf).unwrap())
                .map(|f| f.kind)
                .collect();
        assert_eq!(
            kinds,
            [
                FrameKind::Challenge,
                FrameKind::Response,
                FrameKind::Refusal
            ]
        );
    }

    /// The plaintext handshake (a link for a dedicated cable): the pair
    /// secret is proved, never sent. (On a sealed link the same handshake
    /// runs inside the seal.)
    #[tokio::test]
    async fn the_secret_never_goes_on_the_wire() {
        // The connecting side, against a raw accepting peer.
        let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = raw_listener.local_addr().unwrap();
        let connecting = plaintext(config("node-b", Role::Standby, SECRET));
        let (result, wire) = tokio::time::timeout(WITHIN, async {
            tokio::join!(Link::connect(addr, &connecting), async {
                let (mut raw, _) = raw_listener.accept().await.unwrap();
                capture_against_bogus_prover(&mut raw).await
            })
        })
        .await
        .expect("handshake finished");
        assert!(matches!(
            result,
            Err(LinkError::AuthenticationFailed { .. })
        ));
        assert_secret_absent_but_proof_sent(&wire);

        // The accepting side, against a raw connecting peer.
        let listener = LinkListener::bind(
            "127.0.0.1:0",
            plaintext(config("node-a", Role::Primary, SECRET)),
        )
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let (result, wire) = tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), async {
                let mut raw = TcpStream::connect(addr).await.unwrap();
                capture_against_bogus_prover(&mut raw).await
            })
        })
        .await
        .expect("handshake finished");
        assert!(matches!(
            result,
            Err(LinkError::AuthenticationFailed { .. })
        ));
        assert_secret_absent_but_proof_sent(&wire);
    }

    fn assert_refused_for(
        result: Result<Link, LinkError>,
        side: &str,
        what: fn(&Mismatch) -> bool,
    ) {
        match result {
            Err(LinkError::Incompatible { mismatch, .. })
            | Err(LinkError::PeerRefused {
                reason: Refusal::Incompatible(mismatch),
                ..
            }) => assert!(
                what(&mismatch),
                "{side}: refused for another reason: {mismatch}"
            ),
            Err(other) => panic!("{side}: wrong error {other}"),
            Ok(_) => panic!("{side}: paired incompatible nodes"),
        }
    }

    #[tokio::test]
    async fn cpu_feature_mismatch_is_refused_on_both_sides() {
        let a = config("node-a", Role::Primary, SECRET);
        let mut b = config("node-b", Role::Standby, SECRET);
        b.hello.cpu.words[1] ^= 1 << 4;
        let (accepted, connected) = pair(a, b).await;
        let is_cpu = |m: &Mismatch| {
            matches!(m, Mismatch::CpuFeatures { differing, .. } if *differing == vec![1])
                && m.to_string().contains("CPU features differ")
        };
        assert_refused_for(accepted, "accepting", is_cpu);
        assert_refused_for(connected, "connecting", is_cpu);
    }

    #[tokio::test]
    async fn vm_fingerprint_mismatch_is_refused_on_both_sides() {
        let a = config("node-a", Role::Primary, SECRET);
        let mut b = config("node-b", Role::Standby, SECRET);
        b.hello.vm_fingerprint = "vm-sha256:beef".into();
        let (accepted, connected) = pair(a, b).await;
        let is_vm = |m: &Mismatch| {
            matches!(m, Mismatch::VmFingerprint { .. }) && m.to_string().contains("vm-sha256:beef")
        };
        assert_refused_for(accepted, "accepting", is_vm);
        assert_refused_for(connected, "connecting", is_vm);
    }

    #[tokio::test]
    async fn a_refusal_from_the_peer_is_reported_with_its_reason() {
        // The raw peer authenticates properly, then refuses instead of
        // sending its Hello: only the peer's refusal can tell the link why.
        let listener = LinkListener::bind(
            "127.0.0.1:0",
            plaintext(config("node-a", Role::Primary, SECRET)),
        )
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let secret = PairSecret::new(SECRET.to_vec()).unwrap();
        let (result, ()) = tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), async {
                let mut raw = TcpStream::connect(addr).await.unwrap();
                let peer = raw.peer_addr().unwrap();
                let mut rx = Inbound::new(BytesMut::new());
                let mine = Nonce::fresh().unwrap();
                raw.write_all(&encoded(&Frame::new(
                    FrameKind::Challenge,
                    0,
                    mine.as_bytes().to_vec(),
                )))
                .await
                .unwrap();
                let theirs = read_frame_within(&mut raw, peer, &mut rx, u32::MAX)
                    .await
                    .unwrap();
                let theirs = Nonce::from_wire(&theirs.payload).unwrap();
                let proof = auth::prove(&secret, Side::Connecting, &theirs, &mine);
                raw.write_all(&encoded(&Frame::new(
                    FrameKind::Response,
                    0,
                    proof.to_vec(),
                )))
                .await
                .unwrap();
                let refusal = Refusal::ProtocolViolation("standby disk not ready".into());
                raw.write_all(&encoded(&Frame::new(
                    FrameKind::Refusal,
                    0,
                    refusal.to_payload().unwrap(),
                )))
                .await
                .unwrap();
                raw.shutdown().await.unwrap();
                let mut rest = Vec::new();
                raw.read_to_end(&mut rest).await.unwrap();
            })
        })
        .await
        .expect("handshake finished");
        match result {
            Err(
                err @ LinkError::PeerRefused {
                    reason: Refusal::ProtocolViolation(_),
                    ..
                },
            ) => assert!(err.to_string().contains("standby disk not ready"), "{err}"),
            Err(other) => panic!("wrong error {other}"),
            Ok(_) => panic!("paired with a refusing peer"),
        }
    }
}
