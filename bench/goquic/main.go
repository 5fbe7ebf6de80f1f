// Command goquic is the quic-go peer of the benchmark suite: the same
// single-stream transfer as bench/quicraw.py, on the reference's stack.
//
// It is built at bench time in GOPATH mode against Debian's quic-go
// (golang-github-lucas-clemente-quic-go-dev, /usr/share/gocode), never through
// a module proxy. Wire protocol of one stream (shared with the Python peers):
//
//	'S' payload... FIN   -> server answers the payload length (8 bytes, big endian), FIN
//	'E' bytes...         -> server echoes every byte (including the 'E') until FIN
//	'D' size(8)          -> server sends size bytes, FIN
//
// Usage:
//
//	goquic server -listen 127.0.0.1:PORT -cert relay.crt -key relay.key -ca ca.crt
//	goquic client -addr 127.0.0.1:PORT -cert agent.crt -key agent.key -ca ca.crt -mode upload -size N
//	goquic client ... -mode download -size N
//	goquic client ... -mode ttfb -count K
//
// The client prints one JSON object on stdout.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	quic "github.com/lucas-clemente/quic-go"
)

// The server also offers orp/1, so outrelay's own QUIC client can dial it.
var alpns = []string{"bench", "orp/1"}

func tlsConfig(cert, key, ca string, server bool) *tls.Config {
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		fail(err)
	}
	pem, err := os.ReadFile(ca)
	if err != nil {
		fail(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fail(errors.New("no CA certificate in " + ca))
	}
	conf := &tls.Config{
		Certificates: []tls.Certificate{pair},
		NextProtos:   alpns,
		MinVersion:   tls.VersionTLS13,
	}
	if !server {
		conf.NextProtos = alpns[:1]
	}
	if server {
		conf.ClientCAs = pool
		conf.ClientAuth = tls.RequireAndVerifyClientCert
	} else {
		conf.RootCAs = pool
		conf.ServerName = "localhost"
	}
	return conf
}

func quicConfig() *quic.Config {
	return &quic.Config{MaxIdleTimeout: 30 * time.Second, HandshakeIdleTimeout: 10 * time.Second}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "goquic:", err)
	os.Exit(1)
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// ---- server ------------------------------------------------------------------

func serve(listen, cert, key, ca string) {
	ln, err := quic.ListenAddr(listen, tlsConfig(cert, key, ca, true), quicConfig())
	if err != nil {
		fail(err)
	}
	fmt.Println("ready", ln.Addr())
	for {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			fail(err)
		}
		go func(conn quic.Connection) {
			for {
				stream, err := conn.AcceptStream(context.Background())
				if err != nil {
					return
				}
				go handle(stream)
			}
		}(conn)
	}
}

func handle(stream quic.Stream) {
	defer stream.Close()
	mode := make([]byte, 1)
	if _, err := io.ReadFull(stream, mode); err != nil {
		return
	}
	switch mode[0] {
	case 'S':
		n, _ := io.Copy(io.Discard, stream)
		reply := make([]byte, 8)
		binary.BigEndian.PutUint64(reply, uint64(n))
		_, _ = stream.Write(reply)
	case 'E':
		if _, err := stream.Write(mode); err != nil {
			return
		}
		_, _ = io.Copy(stream, stream)
	case 'D':
		hdr := make([]byte, 8)
		if _, err := io.ReadFull(stream, hdr); err != nil {
			return
		}
		writeN(stream, binary.BigEndian.Uint64(hdr))
	}
}

func writeN(w io.Writer, n uint64) {
	buf := make([]byte, 256*1024)
	for n > 0 {
		chunk := buf
		if uint64(len(chunk)) > n {
			chunk = chunk[:n]
		}
		if _, err := w.Write(chunk); err != nil {
			return
		}
		n -= uint64(len(chunk))
	}
}

// ---- client ------------------------------------------------------------------

func dial(addr string, conf *tls.Config) quic.Connection {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := quic.DialAddrContext(ctx, addr, conf, quicConfig())
	if err != nil {
		fail(err)
	}
	return conn
}

func openStream(conn quic.Connection) quic.Stream {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := conn.OpenStreamSync(ctx)
	if err != nil {
		fail(err)
	}
	return stream
}

func client(addr, cert, key, ca, mode string, size uint64, count int) {
	conf := tlsConfig(cert, key, ca, false)
	out := map[string]interface{}{"mode": mode, "bytes": size}
	switch mode {
	case "upload", "download":
		conn := dial(addr, conf)
		cpu0 := cpuSeconds()
		start := time.Now()
		stream := openStream(conn)
		if mode == "upload" {
			if _, err := stream.Write([]byte{'S'}); err != nil {
				fail(err)
			}
			writeN(stream, size)
			if err := stream.Close(); err != nil {
				fail(err)
			}
			reply := make([]byte, 8)
			if _, err := io.ReadFull(stream, reply); err != nil {
				fail(err)
			}
			if got := binary.BigEndian.Uint64(reply); got != size {
				fail(fmt.Errorf("server counted %d bytes, sent %d", got, size))
			}
		} else {
			req := make([]byte, 9)
			req[0] = 'D'
			binary.BigEndian.PutUint64(req[1:], size)
			if _, err := stream.Write(req); err != nil {
				fail(err)
			}
			if err := stream.Close(); err != nil {
				fail(err)
			}
			n, err := io.Copy(io.Discard, stream)
			if err != nil {
				fail(err)
			}
			if uint64(n) != size {
				fail(fmt.Errorf("received %d bytes, expected %d", n, size))
			}
		}
		out["seconds"] = time.Since(start).Seconds()
		out["cpu"] = cpuSeconds() - cpu0
		_ = conn.CloseWithError(0, "")
	case "ttfb":
		samples := make([]float64, 0, count)
		for i := 0; i < count; i++ {
			start := time.Now()
			conn := dial(addr, conf)
			stream := openStream(conn)
			if _, err := stream.Write([]byte{'E'}); err != nil {
				fail(err)
			}
			one := make([]byte, 1)
			if _, err := io.ReadFull(stream, one); err != nil {
				fail(err)
			}
			samples = append(samples, time.Since(start).Seconds())
			_ = conn.CloseWithError(0, "")
		}
		out["samples"] = samples
	default:
		fail(errors.New("unknown mode " + mode))
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fail(err)
	}
}

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: goquic server|client [flags]"))
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "server: UDP address")
	addr := fs.String("addr", "", "client: server address")
	cert := fs.String("cert", "", "certificate (PEM)")
	key := fs.String("key", "", "private key (PEM)")
	ca := fs.String("ca", "", "CA bundle (PEM)")
	mode := fs.String("mode", "upload", "client: upload, download or ttfb")
	size := fs.Uint64("size", 1<<20, "client: bytes to move")
	count := fs.Int("count", 10, "client ttfb: fresh connections")
	if err := fs.Parse(os.Args[2:]); err != nil {
		fail(err)
	}
	switch os.Args[1] {
	case "server":
		serve(*listen, *cert, *key, *ca)
	case "client":
		client(*addr, *cert, *key, *ca, *mode, *size, *count)
	default:
		fail(errors.New("unknown command " + os.Args[1]))
	}
}
