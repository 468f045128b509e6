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
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "echo") == 0)
		return echo(strtoul(argv[2], NULL, 0), strtol(argv[3], NULL, 0));
	if (argc == 5 && strcmp(argv[1], "send") == 0)
		return send_pattern(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0),
				    strtoull(argv[4], NULL, 0));
	fprintf(stderr, "usage: vsock-tool echo <port> <connections> | send <cid> <port> <bytes>\n");
	return 2;
}
