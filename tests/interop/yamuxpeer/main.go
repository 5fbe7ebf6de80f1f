// yamuxpeer: a hashicorp/yamux peer with scripted scenarios, for interop tests
// of outrelay's own yamux (tests/interop/test_yamux_go.py).
//
// It speaks plain TCP on 127.0.0.1 (TLS is not part of yamux interop). With
// -role server it listens, prints "LISTEN <addr>", accepts one connection and
// runs a yamux server session; with -role client it dials -addr and runs a
// yamux client session. Either way it runs one -scenario against the Python
// side, prints "OK" or "FAIL <reason>" (plus "WRITE_MS <n>" where a scenario
// times its writes), then waits for the Python side to close the session.
//
// Configuration: yamux.DefaultConfig() with keep-alive disabled, as the
// reference relay and agent use it (spec 02 §9.1, spec 03 §2.2).
//
// Build offline from Debian's golang-github-hashicorp-yamux-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off go build -o yamuxpeer .
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// pattern is the byte stream both sides agree on: byte i is i mod 251.
func pattern(n int) []byte {
	out := make([]byte, n)
	for i := range out {
		out[i] = byte(i % 251)
	}
	return out
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

type peer struct {
	sess *yamux.Session
	size int
}

type scenario func(p *peer) error

var scenarios = map[string]scenario{
	// We accept streams and echo each until EOF, then close (FIN).
	"echo": func(p *peer) error {
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for i := 0; i < 8; i++ {
			s, err := p.sess.AcceptStream()
			if err != nil {
				return fmt.Errorf("accept %d: %v", i, err)
			}
			wg.Add(1)
			go func(s *yamux.Stream) {
				defer wg.Done()
				if _, err := io.Copy(s, s); err != nil {
					errs <- fmt.Errorf("echo stream %d: %v", s.StreamID(), err)
				}
				s.Close()
			}(s)
		}
		wg.Wait()
		close(errs)
		return <-errs
	},
	// We open a stream, write the pattern, then FIN.
	"send": func(p *peer) error {
		s, err := p.sess.OpenStream()
		if err != nil {
			return err
		}
		start := time.Now()
		if _, err := s.Write(pattern(p.size)); err != nil {
			return fmt.Errorf("write: %v", err)
		}
		fmt.Printf("WRITE_MS %d\n", time.Since(start).Milliseconds())
		return s.Close()
	},
	// We accept a stream, read to EOF (the peer half-closed), check it, then
	// answer on the still-open direction with the digest and FIN.
	"recv": func(p *peer) error {
		s, err := p.sess.AcceptStream()
		if err != nil {
			return err
		}
		got, err := io.ReadAll(s)
		if err != nil {
			return fmt.Errorf("read: %v", err)
		}
		if !bytes.Equal(got, pattern(p.size)) {
			return fmt.Errorf("got %d bytes, not the %d-byte pattern", len(got), p.size)
		}
		if _, err := s.Write([]byte(digest(got))); err != nil {
			return fmt.Errorf("reply after the peer's FIN: %v", err)
		}
		return s.Close()
	},
	// We accept a stream and write and read the pattern at the same time.
	"bidir": func(p *peer) error {
		s, err := p.sess.AcceptStream()
		if err != nil {
			return err
		}
		werr := make(chan error, 1)
		go func() {
			_, err := s.Write(pattern(p.size))
			werr <- err
		}()
		got, err := io.ReadAll(s)
		if err != nil {
			return fmt.Errorf("read: %v", err)
		}
		if err := <-werr; err != nil {
			return fmt.Errorf("write: %v", err)
		}
		if !bytes.Equal(got, pattern(p.size)) {
			return fmt.Errorf("got %d bytes, not the %d-byte pattern", len(got), p.size)
		}
		return s.Close()
	},
	// We accept a stream and read it slowly: the Python writer must wait for
	// our window updates instead of overrunning the 256 KiB window.
	"slowread": func(p *peer) error {
		s, err := p.sess.AcceptStream()
		if err != nil {
			return err
		}
		time.Sleep(300 * time.Millisecond)
		var got []byte
		buf := make([]byte, 16*1024)
		for {
			n, err := s.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				return fmt.Errorf("read: %v", err)
			}
			time.Sleep(2 * time.Millisecond)
		}
		if !bytes.Equal(got, pattern(p.size)) {
			return fmt.Errorf("got %d bytes, not the %d-byte pattern", len(got), p.size)
		}
		if _, err := s.Write([]byte("ok")); err != nil {
			return err
		}
		return s.Close()
	},
	// We accept a stream; the Python side resets it while we read.
	"reset": func(p *peer) error {
		s, err := p.sess.AcceptStream()
		if err != nil {
			return err
		}
		buf := make([]byte, 1024)
		for {
			_, err := s.Read(buf)
			if err == yamux.ErrConnectionReset {
				break
			}
			if err != nil {
				return fmt.Errorf("read: want ErrConnectionReset, got %v", err)
			}
		}
		if _, err := s.Write([]byte("x")); err != yamux.ErrConnectionReset {
			return fmt.Errorf("write after RST: want ErrConnectionReset, got %v", err)
		}
		return nil
	},
	// Backlog of 1 and we never accept: the peer's second stream gets RST.
	"backlog": func(p *peer) error {
		return nil
	},
	// We send GO_AWAY, then still open a stream of our own.
	"goaway_go": func(p *peer) error {
		if err := p.sess.GoAway(); err != nil {
			return err
		}
		s, err := p.sess.OpenStream()
		if err != nil {
			return fmt.Errorf("open after our GO_AWAY: %v", err)
		}
		if _, err := s.Write([]byte("hi")); err != nil {
			return err
		}
		return s.Close()
	},
	// The peer sends GO_AWAY before its FIN: then we may not open streams.
	"goaway_py": func(p *peer) error {
		s, err := p.sess.AcceptStream()
		if err != nil {
			return err
		}
		if _, err := io.ReadAll(s); err != nil {
			return err
		}
		if _, err := p.sess.OpenStream(); err != yamux.ErrRemoteGoAway {
			return fmt.Errorf("open after the peer's GO_AWAY: want ErrRemoteGoAway, got %v", err)
		}
		return s.Close()
	},
	// Pings both ways.
	"ping": func(p *peer) error {
		for i := 0; i < 3; i++ {
			if _, err := p.sess.Ping(); err != nil {
				return fmt.Errorf("ping %d: %v", i, err)
			}
		}
		s, err := p.sess.AcceptStream()
		if err != nil {
			return err
		}
		got, err := io.ReadAll(s)
		if err != nil || string(got) != "pinged" {
			return fmt.Errorf("read %q, %v", got, err)
		}
		return s.Close()
	},
	// We open 20 streams at once, write, read the echo back, close.
	"many": func(p *peer) error {
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				s, err := p.sess.OpenStream()
				if err != nil {
					errs <- err
					return
				}
				data := pattern(p.size + i)
				go s.Write(data)
				got := make([]byte, len(data))
				if _, err := io.ReadFull(s, got); err != nil {
					errs <- fmt.Errorf("stream %d: %v", s.StreamID(), err)
					return
				}
				if !bytes.Equal(got, data) {
					errs <- fmt.Errorf("stream %d: echo differs", s.StreamID())
				}
				s.Close()
			}(i)
		}
		wg.Wait()
		close(errs)
		return <-errs
	},
}

func main() {
	role := flag.String("role", "server", "server: listen and run a yamux server; client: dial")
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on or dial")
	name := flag.String("scenario", "echo", "scenario to run")
	size := flag.Int("size", 1<<20, "bytes for transfer scenarios")
	flag.Parse()

	run, ok := scenarios[*name]
	if !ok {
		fmt.Printf("FAIL unknown scenario %q\n", *name)
		os.Exit(2)
	}
	var conn net.Conn
	var err error
	if *role == "server" {
		ln, err := net.Listen("tcp", *addr)
		if err != nil {
			fmt.Printf("FAIL listen: %v\n", err)
			os.Exit(1)
		}
		fmt.Printf("LISTEN %s\n", ln.Addr())
		conn, err = ln.Accept()
		if err != nil {
			fmt.Printf("FAIL accept: %v\n", err)
			os.Exit(1)
		}
		ln.Close()
	} else {
		conn, err = net.DialTimeout("tcp", *addr, 5*time.Second)
		if err != nil {
			fmt.Printf("FAIL dial: %v\n", err)
			os.Exit(1)
		}
	}
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = false
	cfg.LogOutput = os.Stderr
	if *name == "backlog" {
		cfg.AcceptBacklog = 1
	}
	var sess *yamux.Session
	if *role == "server" {
		sess, err = yamux.Server(conn, cfg)
	} else {
		sess, err = yamux.Client(conn, cfg)
	}
	if err != nil {
		fmt.Printf("FAIL session: %v\n", err)
		os.Exit(1)
	}
	done := make(chan error, 1)
	go func() { done <- run(&peer{sess: sess, size: *size}) }()
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		err = errors.New("scenario timed out")
	}
	if err != nil {
		fmt.Printf("FAIL %v\n", err)
	} else {
		fmt.Println("OK")
	}
	// Let the Python side finish and close the session.
	select {
	case <-sess.CloseChan():
	case <-time.After(10 * time.Second):
		fmt.Println("FAIL the peer never closed the session")
		err = errors.New("no close")
	}
	if err != nil {
		os.Exit(1)
	}
}
