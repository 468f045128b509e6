/*
 * vsock-tool: the guest side of Tessera's vsock tests, for a busybox
 * rootfs (busybox's nc has no AF_VSOCK).
 *
 *   vsock-tool echo <port> <connections>
 *       listens on <port> and sends every byte of each connection back,
 *       one connection after the other, until <connections> have ended.
 *   vsock-tool send <cid> <port> <bytes>
 *       connects to <cid>:<port>, sends <bytes> bytes of the pattern
 *       i % 251, shuts its sending side down and waits for the peer to
 *       close; exits 0 if every byte went out.
 *
 * and the host side of Firecracker's hybrid vsock, for hosts without a
 * scripting language (the nested harness's L1):
 *
 *   vsock-tool host-echo <uds_path> <port> <bytes>
 *       connects to <uds_path>, asks for guest port <port> (CONNECT, OK),
 *       sends <bytes> bytes of the pattern i % 251 while reading them
 *       back; exits 0 if the echo is the pattern.
 *   vsock-tool host-recv <path> <bytes>
 *       listens on the Unix socket <path> (a vsock device's
 *       <uds_path>_<port>), takes one connection and reads it to its end;
 *       exits 0 if it carried <bytes> bytes of the pattern i % 251.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int echo(unsigned port, long connections)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_cid = VMADDR_CID_ANY,
		.svm_port = port,
	};
	int listener = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    listen(listener, 16) < 0) {
		perror("vsock-tool: listen");
		return 1;
	}
	printf("vsock-tool: listening on %u\n", port);
	fflush(stdout);
	static char buf[65536];
	for (long done = 0; done < connections; done++) {
		int conn = accept(listener, NULL, NULL);
		if (conn < 0) {
			perror("vsock-tool: accept");
			return 1;
		}
		ssize_t n;
		while ((n = read(conn, buf, sizeof(buf))) > 0) {
			for (ssize_t off = 0; off < n;) {
				ssize_t w = write(conn, buf + off, n - off);
				if (w <= 0) {
					perror("vsock-tool: write");
					return 1;
				}
				off += w;
			}
		}
		close(conn);
	}
	return 0;
}

static int send_pattern(unsigned cid, unsigned port, unsigned long long bytes)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_cid = cid,
		.svm_port = port,
	};
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("vsock-tool: connect");
		return 1;
	}
	static unsigned char pattern[251 + 65536];
	for (size_t i = 0; i < sizeof(pattern); i++)
		pattern[i] = i % 251;
	unsigned long long sent = 0;
	while (sent < bytes) {
		size_t chunk = bytes - sent < 65536 ? bytes - sent : 65536;
		ssize_t w = write(s, pattern + sent % 251, chunk);
		if (w <= 0) {
			perror("vsock-tool: write");
			return 1;
		}
		sent += w;
	}
	shutdown(s, SHUT_WR);
	char c;
	while (read(s, &c, 1) > 0)
		;
	close(s);
	return 0;
}

static int unix_address(const char *path, struct sockaddr_un *addr)
{
	memset(addr, 0, sizeof(*addr));
	addr->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(addr->sun_path)) {
		fprintf(stderr, "vsock-tool: %s: path too long\n", path);
		return -1;
	}
	strcpy(addr->sun_path, path);
	return 0;
}

/* Checks that buf[0..n) is the pattern from offset `at`. */
static int is_pattern(const unsigned char *buf, size_t n, unsigned long long at)
{
	for (size_t i = 0; i < n; i++)
		if (buf[i] != (at + i) % 251)
			return 0;
	return 1;
}

static int host_echo(const char *path, unsigned port, unsigned long long bytes)
{
	struct sockaddr_un addr;
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	if (s < 0 || unix_address(path, &addr) < 0 ||
	    connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("vsock-tool: connect");
		return 1;
	}
	char line[64];
	int len = snprintf(line, sizeof(line), "CONNECT %u\n", port);
	if (write(s, line, len) != len) {
		perror("vsock-tool: CONNECT");
		return 1;
	}
	size_t got = 0;
	while (got < sizeof(line) - 1 && read(s, line + got, 1) == 1 && line[got] != '\n')
		got++;
	line[got] = 0;
	if (strncmp(line, "OK ", 3) != 0) {
		fprintf(stderr, "vsock-tool: CONNECT %u answered \"%s\"\n", port, line);
		return 1;
	}
	pid_t writer = fork();
	if (writer == 0) {
		static unsigned char pattern[251 + 65536];
		for (size_t i = 0; i < sizeof(pattern); i++)
			pattern[i] = i % 251;
		unsigned long long sent = 0;
		while (sent < bytes) {
			size_t chunk = bytes - sent < 65536 ? bytes - sent : 65536;
			ssize_t w = write(s, pattern + sent % 251, chunk);
			if (w <= 0)
				_exit(1);
			sent += w;
		}
		_exit(0);
	}
	static unsigned char buf[65536];
	unsigned long long echoed = 0;
	while (echoed < bytes) {
		ssize_t n = read(s, buf, sizeof(buf));
		if (n <= 0)
			break;
		if (!is_pattern(buf, n, echoed)) {
			fprintf(stderr, "vsock-tool: the echo differs after %llu bytes\n", echoed);
			return 1;
		}
		echoed += n;
	}
	int status = 1;
	waitpid(writer, &status, 0);
	close(s);
	if (echoed != bytes || status != 0) {
		fprintf(stderr, "vsock-tool: %llu of %llu bytes echoed\n", echoed, bytes);
		return 1;
	}
	return 0;
}

static int host_recv(const char *path, unsigned long long bytes)
{
	struct sockaddr_un addr;
	int l = socket(AF_UNIX, SOCK_STREAM, 0);
	unlink(path);
	if (l < 0 || unix_address(path, &addr) < 0 ||
	    bind(l, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(l, 4) < 0) {
		perror("vsock-tool: listen");
		return 1;
	}
	int s = accept(l, NULL, NULL);
	if (s < 0) {
		perror("vsock-tool: accept");
		return 1;
	}
	static unsigned char buf[65536];
	unsigned long long got = 0;
	ssize_t n;
	while ((n = read(s, buf, sizeof(buf))) > 0) {
		if (!is_pattern(buf, n, got)) {
			fprintf(stderr, "vsock-tool: the bytes differ after %llu\n", got);
			return 1;
		}
		got += n;
	}
	if (got != bytes) {
		fprintf(stderr, "vsock-tool: %llu of %llu bytes came\n", got, bytes);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "host-echo") == 0)
		return host_echo(argv[2], strtoul(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
	if (argc == 4 && strcmp(argv[1], "host-recv") == 0)
		return host_recv(argv[2], strtoull(argv[3], NULL, 0));
	if (argc == 4 && strcmp(argv[1], "echo") == 0)
		return echo(strtoul(argv[2], NULL, 0), strtol(argv[3], NULL, 0));
	if (argc == 5 && strcmp(argv[1], "send") == 0)
		return send_pattern(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0),
				    strtoull(argv[4], NULL, 0));
	fprintf(stderr, "usage: vsock-tool echo <port> <connections> | send <cid> <port> <bytes>\n"
			"       vsock-tool host-echo <uds_path> <port> <bytes> | host-recv <path> <bytes>\n");
	return 2;
}
