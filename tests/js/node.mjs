#!/usr/bin/env node
// A js-libp2p 2.x node that punchgate's tests run as a foreign peer.
//
//   node tests/js/node.mjs [flags]
//
// Node flags:
//   --listen MULTIADDR       listen here (repeatable); default /ip4/127.0.0.1/tcp/0
//                            (and /ip4/127.0.0.1/udp/0/quic-v1 with --quic); a
//                            /p2p-circuit address asks a relay for a slot
//   --key-file PATH          Ed25519 identity, libp2p protobuf as js/go-libp2p write it (not
//                            interchangeable with punchgate's); created (mode 0600) if absent
//   --bootstrap MULTIADDR    dial this peer at start (repeatable)
//   --dht                    run kad-dht in server mode (/ipfs/kad/1.0.0, every address kept)
//   --relay                  run a circuit relay v2 server
//   --relay-limit default|none   relayed connections limited to 2 min / 128 KiB each
//                            (js-libp2p's and go-libp2p's default), or not at all
//   --autonat                AutoNAT v1 service (answers dial-back requests, asks peers)
//   --psk PATH               private network: key file "/key/swarm/psk/1.0.0/\n/base16/\n<64 hex>"
//   --quic                   add the QUIC transport (@chainsafe/libp2p-quic); not with --psk
// Actions (then the node stops and exits):
//   --dial MULTIADDR         dial this peer (alone: dial it and keep running)
//   --ping                   ping the dialled peer once
//   --tunnel SERVICE         open /punchgate/tunnel/1.0.0 to it, ask for SERVICE, then send
//   --payload-bytes N        N random bytes (default 1048576), half-close, read all back
//   --timeout SECONDS        bound on the actions (default 60)
//
// Output: one JSON object per line on stdout, "started" first:
//   {"event": "started", "peer_id", "addrs"}
//   {"event": "connection opened" | "connection closed", "peer", "remote_addr",
//    "direction", "limited", "relayed"}
//   {"event": "identified", "peer", "agent", "protocols", "listen_addrs", "observed_addr"}
//   {"event": "addresses", "addrs"}  (ours changed, e.g. a relay reservation added one)
//   {"event": "reservation", "peer", "addr", "expires", "limit", "renewed"} (relay server)
//   {"event": "reservation ended", "peer"}
//   {"event": "dial", "addr", "ok", "peer" | "error"}       (--bootstrap and --dial)
//   {"event": "ping", "peer", "ok", "rtt_ms" | "error"}
//   {"event": "tunnel", "service", "accepted", "reason", "sent_bytes", "received_bytes",
//    "sent_sha256", "received_sha256", "duration_ms", "error"}
//   {"event": "error", "reason"}    (the node could not start: exit 1)
//   {"event": "stopped"}            (SIGTERM/SIGINT, or after the actions)
// Exit: 0 (signal, or every action ran: a refused tunnel is a result), 1 (could not
// start, or an action failed: see its event), 2 (bad usage, one line on stderr).

import { createHash, randomBytes } from 'node:crypto'
import { link, open, readFile, unlink } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { parseArgs } from 'node:util'

// Node 20 has no Promise.withResolvers (Node 22 has); it-queue (through mortice, used by
// the peer store) calls it. A standard-conformant stand-in, installed before any use.
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    configurable: true,
    writable: true,
    value: function withResolvers () {
      let resolve, reject
      const promise = new this((res, rej) => { resolve = res; reject = rej })
      return { promise, resolve, reject }
    }
  })
}

const TUNNEL_PROTOCOL = '/punchgate/tunnel/1.0.0'
const KAD_PROTOCOL = '/ipfs/kad/1.0.0' // py-libp2p's DHT protocol (kad-dht 15's default too: pinned here)
const CHUNK = 64 * 1024
let announcedAddrs = '' // the addresses last printed ("started", then "addresses")

function emit (event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n')
}

function usage (message) {
  process.stderr.write(`node.mjs: error: ${message}\n`)
  process.exit(2)
}

function parseFlags () {
  let parsed
  try {
    parsed = parseArgs({
      strict: true,
      allowPositionals: false,
      options: {
        listen: { type: 'string', multiple: true },
        'key-file': { type: 'string' },
        bootstrap: { type: 'string', multiple: true },
        dht: { type: 'boolean' },
        relay: { type: 'boolean' },
        'relay-limit': { type: 'string', default: 'default' },
        autonat: { type: 'boolean' },
        psk: { type: 'string' },
        quic: { type: 'boolean' },
        dial: { type: 'string' },
        ping: { type: 'boolean' },
        tunnel: { type: 'string' },
        'payload-bytes': { type: 'string', default: String(1 << 20) },
        timeout: { type: 'string', default: '60' }
      }
    })
  } catch (err) {
    usage(err.message)
  }
  const flags = parsed.values
  if (!['default', 'none'].includes(flags['relay-limit'])) {
    usage(`--relay-limit '${flags['relay-limit']}': expected default or none (example: --relay-limit none)`)
  }
  for (const name of ['payload-bytes', 'timeout']) {
    if (!/^\d+(\.\d+)?$/.test(flags[name]) || (name === 'payload-bytes' && !/^\d+$/.test(flags[name]))) {
      usage(`--${name} '${flags[name]}': expected a non-negative number (example: --${name} 1048576)`)
    }
  }
  if ((flags.ping || flags.tunnel !== undefined) && flags.dial === undefined) {
    usage('--ping and --tunnel act on the peer given with --dial (example: --dial /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... --ping)')
  }
  if (flags.psk !== undefined && flags.quic) {
    // QUIC connections skip the connection protector: the key would not guard them.
    usage('--psk cannot be combined with --quic: QUIC connections would bypass the private-network key')
  }
  return flags
}

let node = null // the libp2p node, once created
let stopping = false

// SIGTERM/SIGINT (handled from the start, even while modules load): stop, exit 0.
async function stop (code) {
  if (stopping) return
  stopping = true
  try {
    await node?.stop()
  } finally {
    emit('stopped')
    process.exit(code)
  }
}

async function main () {
  process.on('SIGTERM', () => stop(0))
  process.on('SIGINT', () => stop(0))
  const flags = parseFlags()
  // Modules are imported here: after the shim above, and after the flags are checked.
  const { multiaddr } = await import('@multiformats/multiaddr')
  const addrs = {}
  for (const name of ['listen', 'bootstrap', 'dial']) {
    const values = flags[name] === undefined ? [] : [flags[name]].flat()
    addrs[name] = values.map((value) => {
      try {
        return multiaddr(value)
      } catch (err) {
        usage(`--${name} '${value}': not a multiaddr (${err.message}) (example: --${name} /ip4/127.0.0.1/tcp/4001)`)
      }
    })
  }
  if (addrs.listen.length === 0) {
    addrs.listen.push(multiaddr('/ip4/127.0.0.1/tcp/0'))
    if (flags.quic) addrs.listen.push(multiaddr('/ip4/127.0.0.1/udp/0/quic-v1'))
  }

  try {
    node = await createNode(flags, addrs.listen)
  } catch (err) {
    emit('error', { reason: err.message })
    process.exit(1)
  }
  watchNode(node)
  const ownAddrs = node.getMultiaddrs().map(String)
  announcedAddrs = ownAddrs.join()
  emit('started', { peer_id: node.peerId.toString(), addrs: ownAddrs })

  for (const addr of addrs.bootstrap) {
    await dial(node, addr) // failures are reported, the node runs on
  }
  if (addrs.dial.length === 1) {
    const ok = await runActions(node, addrs.dial[0], flags)
    if (flags.ping || flags.tunnel !== undefined) await stop(ok ? 0 : 1)
  }
}

async function createNode (flags, listen) {
  const { createLibp2p } = await import('libp2p')
  const { tcp } = await import('@libp2p/tcp')
  const { noise } = await import('@chainsafe/libp2p-noise')
  const { yamux } = await import('@chainsafe/libp2p-yamux')
  const { identify } = await import('@libp2p/identify')
  const { ping } = await import('@libp2p/ping')
  const { circuitRelayTransport } = await import('@libp2p/circuit-relay-v2')

  const transports = [tcp(), circuitRelayTransport()]
  if (flags.quic) {
    const { quic } = await import('@chainsafe/libp2p-quic')
    transports.push(quic())
  }
  const services = { identify: identify(), ping: ping() }
  if (flags.dht) {
    const { kadDHT, passthroughMapper } = await import('@libp2p/kad-dht')
    // Loopback and lab addresses stay in the routing table; queries may start with none.
    services.dht = kadDHT({
      protocol: KAD_PROTOCOL,
      clientMode: false,
      peerInfoMapper: passthroughMapper,
      allowQueryWithZeroPeers: true
    })
  }
  if (flags.relay) {
    const { circuitRelayServer } = await import('@libp2p/circuit-relay-v2')
    services.relay = circuitRelayServer({
      reservations: { applyDefaultLimit: flags['relay-limit'] === 'default' }
    })
  }
  if (flags.autonat) {
    const { autoNAT } = await import('@libp2p/autonat')
    services.autonat = autoNAT()
  }
  const options = {
    privateKey: flags['key-file'] === undefined ? undefined : await loadOrCreateKey(flags['key-file']),
    addresses: { listen: listen.map(String) },
    transports,
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services
  }
  if (flags.psk !== undefined) {
    const { preSharedKey } = await import('@libp2p/pnet')
    let psk
    try {
      psk = await readFile(flags.psk)
    } catch (err) {
      throw new Error(`cannot read --psk file ${flags.psk}: ${err.code ?? err.message}`)
    }
    options.connectionProtector = preSharedKey({ psk })
    // The protector decodes the key only when a connection starts: check it now.
    checkPsk(psk, flags.psk)
  }
  return await createLibp2p(options)
}

function checkPsk (psk, path) {
  const lines = psk.toString('utf8').split(/\r?\n/)
  if (lines[0] !== '/key/swarm/psk/1.0.0/' || lines[1] !== '/base16/' || !/^[0-9a-fA-F]{64}$/.test(lines[2] ?? '')) {
    throw new Error(`--psk file ${path} is not "/key/swarm/psk/1.0.0/", "/base16/" and 64 hex digits on three lines`)
  }
}

async function loadOrCreateKey (path) {
  const { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } = await import('@libp2p/crypto/keys')
  let data
  try {
    data = await readFile(path)
  } catch (err) {
    if (err.code !== 'ENOENT') throw new Error(`cannot read --key-file ${path}: ${err.code}`)
  }
  if (data !== undefined) {
    try {
      return privateKeyFromProtobuf(data)
    } catch (err) {
      throw new Error(`--key-file ${path} is not a libp2p private key (${err.message}); move it away to create a new one`)
    }
  }
  const key = await generateKeyPair('Ed25519')
  // Written aside then linked into place: never half a key, never over another one.
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`)
  let file
  try {
    file = await open(tmp, 'wx', 0o600)
    await file.writeFile(privateKeyToProtobuf(key))
    await file.sync()
    await file.close()
    await link(tmp, path)
  } catch (err) {
    throw new Error(`cannot create --key-file ${path}: ${err.code ?? err.message}`)
  } finally {
    await file?.close().catch(() => {})
    await unlink(tmp).catch(() => {})
  }
  return key
}

function describeConnection (conn) {
  return {
    peer: conn.remotePeer.toString(),
    remote_addr: conn.remoteAddr.toString(),
    direction: conn.direction,
    limited: conn.limits != null,
    relayed: conn.remoteAddr.protoNames().includes('p2p-circuit')
  }
}

function watchNode (node) {
  node.addEventListener('connection:open', (evt) => emit('connection opened', describeConnection(evt.detail)))
  node.addEventListener('connection:close', (evt) => emit('connection closed', describeConnection(evt.detail)))
  node.addEventListener('peer:identify', (evt) => {
    const result = evt.detail
    emit('identified', {
      peer: result.peerId.toString(),
      agent: result.agentVersion ?? null,
      protocols: result.protocols,
      listen_addrs: (result.listenAddrs ?? []).map((a) => a.toString()),
      observed_addr: result.observedAddr?.toString() ?? null
    })
  })
  // Our own addresses changed (a relay reservation adds a /p2p-circuit one).
  node.addEventListener('self:peer:update', () => {
    const addrs = node.getMultiaddrs().map(String)
    if (node.status === 'started' && addrs.join() !== announcedAddrs) {
      announcedAddrs = addrs.join()
      emit('addresses', { addrs })
    }
  })
  const relay = node.services.relay
  if (relay !== undefined) {
    // circuit-relay-v2 3.2.24 declares a 'relay:reservation' event but never sends it;
    // its public reservations map is written once per accepted (or renewed) reservation.
    const reservations = relay.reservations
    const set = reservations.set.bind(reservations)
    const remove = reservations.delete.bind(reservations)
    reservations.set = (peer, reservation) => {
      const renewed = reservations.has(peer)
      set(peer, reservation)
      const limit = reservation.limit
      emit('reservation', {
        peer: peer.toString(),
        addr: reservation.addr.toString(),
        expires: Math.round(reservation.expiry.getTime() / 1000),
        limit: limit == null
          ? null
          : { duration_s: limit.duration == null ? null : limit.duration / 1000, data_bytes: limit.data == null ? null : Number(limit.data) },
        renewed
      })
    }
    reservations.delete = (peer) => {
      const had = reservations.has(peer)
      remove(peer)
      if (had) emit('reservation ended', { peer: peer.toString() })
    }
  }
}

async function dial (node, addr, signal) {
  try {
    const conn = await node.dial(addr, { signal })
    emit('dial', { addr: addr.toString(), ok: true, peer: conn.remotePeer.toString() })
    return conn
  } catch (err) {
    emit('dial', { addr: addr.toString(), ok: false, error: err.message })
    return null
  }
}

async function runActions (node, addr, flags) {
  const signal = AbortSignal.timeout(Number(flags.timeout) * 1000)
  const conn = await dial(node, addr, signal)
  if (conn === null) return false
  let ok = true
  if (flags.ping) {
    try {
      const rtt = await node.services.ping.ping(conn.remotePeer, { signal })
      emit('ping', { peer: conn.remotePeer.toString(), ok: true, rtt_ms: rtt })
    } catch (err) {
      emit('ping', { peer: conn.remotePeer.toString(), ok: false, error: err.message })
      ok = false
    }
  }
  if (flags.tunnel !== undefined) {
    const result = await tunnel(conn, flags.tunnel, Number(flags['payload-bytes']), signal)
    emit('tunnel', result)
    ok = ok && result.error === null
  }
  return ok
}

function frame (message) {
  const body = Buffer.from(JSON.stringify(message), 'utf8')
  const header = Buffer.alloc(4)
  header.writeUInt32BE(body.length)
  return Buffer.concat([header, body])
}

// The punchgate tunnel: request frame, response frame, then raw bytes both ways.
async function tunnel (conn, service, size, signal) {
  const started = performance.now()
  const payload = randomBytes(size)
  const result = {
    service,
    accepted: null,
    reason: null,
    sent_bytes: 0,
    received_bytes: 0,
    sent_sha256: createHash('sha256').update(payload).digest('hex'),
    received_sha256: null,
    duration_ms: null,
    error: null
  }
  let stream
  const answered = Promise.withResolvers()
  try {
    stream = await conn.newStream(TUNNEL_PROTOCOL, { signal, runOnLimitedConnection: true })
    const onAbort = () => stream.abort(new Error('--timeout reached'))
    signal.addEventListener('abort', onAbort, { once: true })
    const sending = stream.sink((async function * () {
      yield frame({ service_name: service })
      if (!await answered.promise) return // refused: half-close at once
      for (let offset = 0; offset < payload.length; offset += CHUNK) {
        const chunk = payload.subarray(offset, offset + CHUNK)
        yield chunk
        result.sent_bytes += chunk.length
      }
    })())
    sending.catch(() => {}) // its failure shows in the reading below, or is awaited there
    const digest = createHash('sha256')
    let pending = Buffer.alloc(0)
    for await (const chunk of stream.source) {
      const bytes = chunk.subarray()
      if (result.accepted !== null) {
        digest.update(bytes)
        result.received_bytes += bytes.length
        continue
      }
      pending = Buffer.concat([pending, bytes])
      if (pending.length < 4 || pending.length < 4 + pending.readUInt32BE(0)) continue
      const length = pending.readUInt32BE(0)
      const response = JSON.parse(pending.subarray(4, 4 + length).toString('utf8'))
      result.accepted = response.accepted === true
      result.reason = response.reason ?? null
      const rest = pending.subarray(4 + length)
      digest.update(rest)
      result.received_bytes += rest.length
      answered.resolve(result.accepted)
    }
    if (result.accepted === null) throw new Error('stream ended before the tunnel response')
    answered.resolve(false)
    await sending
    signal.removeEventListener('abort', onAbort)
    result.received_sha256 = digest.digest('hex')
  } catch (err) {
    answered.resolve(false)
    result.error = err.message
    stream?.abort(err)
  }
  result.duration_ms = Math.round(performance.now() - started)
  return result
}

main().catch((err) => {
  emit('error', { reason: err.stack ?? String(err) })
  process.exit(1)
})
